"""Serving: the OpenAI-compatible routing gateway, its config, backends and the outcome
store that learns from live feedback (`tagrouter_fast.serve.outcomes`)."""
