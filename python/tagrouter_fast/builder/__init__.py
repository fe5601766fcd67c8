"""Build time: routing tables (judgments) -> records -> store -> router bundle.

Runs offline, never per query; the runtime (`tagrouter_fast.router`, `tagrouter_fast.tagging`)
does not import it.
"""
