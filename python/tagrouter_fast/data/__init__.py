"""The base tier: the formats every other tier reads.

Judgment tables (`table`: who won, tied or lost which query, as CSV/JSON) and the model pools
they describe (`pools`). Imports nothing from the rest of the package.
"""
