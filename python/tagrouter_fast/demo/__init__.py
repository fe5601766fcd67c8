"""The demo (a tier above serving: it may import `tagrouter_fast.serve`): what ``tagrouter serve
--demo`` runs, and what tests and benchmarks stand behind the gateway.

`fake_backend` (a commanded OpenAI-compatible backend), `router` (a two-model demo router and
its keyword tagger), `servers` (uvicorn in a thread, a fake backend in a child process),
`start` (the one-command demo), `llama` (a real small model through llama.cpp's server).
"""
