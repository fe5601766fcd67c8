"""The gateway's edge: where requests enter and answers leave. No routing decision is made here.

Protocols (each client protocol parsed into one internal request and back): `wire`,
`openai_chat`, `openai_chat_answers`, `openai_responses`, `anthropic_messages`,
`anthropic_answers`, `sse`, `fields`; `openai_usage` (the usage of an OpenAI answer or
stream, for charging it). The HTTP side: `bodies` (request bodies read within
their limit and checked), `auth` (client keys and the admin check), `errors` (`ApiError` and
the JSON error shape), `completions` (the OpenAI paths), `feedback` (``/v1/route`` and
``/v1/feedback``), `admin` (bodies -> the `Gateway`'s named mutators), `middleware` (the
concurrency guard and the access log), `app` (`create_app` and the route table), `listener`
(uvicorn's HTTP protocol with the listening limits), `startup` (`serve`).
"""
