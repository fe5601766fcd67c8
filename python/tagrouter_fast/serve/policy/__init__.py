"""The gateway's policy: its state and what it decides. `state` (router, backends, sessions,
budgets, learner, keys, decision tokens; start-up and shutdown), `routing` (decisions, the
candidates, the fallback chain, passthrough, sessions, decision tokens), `gateway` (`Gateway`
and its named mutators: `set_theta`, `set_share`, `add_model`, `remove_model`, `reload`,
`snapshot`), `budget` (theta by share of the recent traffic), `sessions` (multi-turn
stickiness), `spending` (prices, charges at the answering backend, key budgets' checks) over
`key_budgets` (per-key limits and their journalled totals)."""
