"""Learning state: what the gateway learns from outcomes, and the keys and tokens that say who
may teach it.

`learner` (the one seam: `Learner`), `outcomes` (the local learner, `OutcomeStore`, built in
layers: `state` <- `registry` <- `commit` <- `snapshots` <- `recovery`; `journal_reader`
follows its journal), `shared` (`SharedLearner`: replicas sharing counts through Redis, with
`shared_sync` and `shared_log`), `shared_budgets` (key budgets' totals shared through Redis),
`keys` (client keys and scopes), `tokens` (signed decision tokens).
"""
