"""Serving: the OpenAI-compatible routing gateway, in the shape of its flows.

`edge` (request bodies and protocols, client keys, errors, the app and its start-up) ->
`policy` (the gateway's state, routing and named mutators) -> `forward` (the one upstream
client, faults, the fallback chain); `learn` (the learner: journal, snapshots, Redis; keys and
decision tokens); `config`; `metrics`; `telemetry` (OpenTelemetry spans, off by default);
`shadow` (shadow mode and its report). `app` re-exports `create_app` and `serve`.
"""
