"""A readable handful of tag groups, from how tags occur together in the traffic.

A router knows hundreds of fine tags; a report per tag is unreadable and too thin to judge.
`group_tags` clusters the most frequent tags by co-occurrence: two tags are alike when the tags
they appear with are alike (cosine of their co-occurrence profiles, so "Poem" and "Essay" meet
through "Writing" without ever sharing a request). Agglomeration on summed profiles: the two most
alike groups merge (a group's profile is the sum of its tags'), while they are alike enough or
there are more than ``max_groups``; groups that share nothing with the rest never merge, and
past ``max_groups`` the smallest fold into "other". Each request then belongs to the group
holding most of its tags.

Deterministic (tags in frequency then name order, ties to the first pair, no randomness) and
offline: it needs no encoder or model, so the same state directory gives the same groups on
any machine. Phrase embeddings (`tagrouter_fast.tagging.encoder`) could name groups for tags
never seen together; co-occurrence was chosen because it is reproducible byte for byte.

>>> g = group_tags([["Poem", "Writing"], ["Essay", "Writing"], ["Math", "Algebra"]] * 3)
>>> g.names, g.assign(["Essay"]), g.assign(["Algebra", "Poem", "Math"]), g.assign(["Unseen"])
(['Writing / Essay / Poem', 'Algebra / Math'], 0, 1, -1)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["OTHER", "TagGroups", "group_tags"]

#: The name of the group of requests whose tags fit no named group.
OTHER = "other"


@dataclass(frozen=True)
class TagGroups:
    """Named groups of tags.

    Attributes:
        names: each group's name: its up to 3 most frequent tags, ``" / "``-joined.
        tags: each group's tags, most frequent first.
        of_tag: the group index of each grouped tag.
    """

    names: list[str]
    tags: list[list[str]]
    of_tag: dict[str, int]

    def assign(self, tags: Sequence[str]) -> int:
        """The group holding most of these tags (ties: the larger group), or -1 ("other")."""
        votes = Counter(self.of_tag[t] for t in set(tags) if t in self.of_tag)
        if not votes:
            return -1
        return min(votes, key=lambda g: (-votes[g], g))


def group_tags(
    tag_lists: Sequence[Sequence[str]], *, max_groups: int = 8, vocab: int = 256,
    min_similarity: float = 0.25,
) -> TagGroups:
    """Groups the tags of these requests (see the module docstring).

    Args:
        tag_lists: each request's tags.
        max_groups: at most this many groups, "other" included when some request fits none.
        vocab: only the this many most frequent tags are grouped (the rest vote for nothing).
        min_similarity: groups at least this alike always merge.

    Raises:
        ValueError: ``max_groups`` < 2, ``vocab`` < 1, ``min_similarity`` outside (0, 1].
    """
    if max_groups < 2:
        raise ValueError(f"max_groups must be >= 2 (a group and 'other'), got {max_groups}")
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    if not 0.0 < min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
    sets = [sorted(set(tags)) for tags in tag_lists]
    freq = Counter(t for s in sets for t in s)
    order = sorted(freq, key=lambda t: (-freq[t], t))[:vocab]
    if not order:
        return TagGroups([], [], {})
    index = {t: i for i, t in enumerate(order)}
    n = len(order)
    co = np.zeros((n, n), dtype=np.float64)
    for s in sets:
        ids = [index[t] for t in s if t in index]
        if ids:
            co[np.ix_(ids, ids)] += 1.0
    members = _agglomerate(co, max_groups, min_similarity)
    size = [sum(freq[order[i]] for i in m) for m in members]
    ranked = sorted(range(len(members)), key=lambda k: (-size[k], min(members[k])))
    clusters = [sorted(members[k], key=lambda i: (-freq[order[i]], order[i])) for k in ranked]

    def build(kept: list[list[int]]) -> TagGroups:
        tags = [[order[i] for i in c] for c in kept]
        return TagGroups([" / ".join(t[:3]) for t in tags], tags,
                         {t: g for g, ts in enumerate(tags) for t in ts})

    groups = build(clusters[:max_groups])
    # Room for "other" when a request would fall there (no grouped tag, or a folded group's).
    if len(clusters) > max_groups or any(groups.assign(s) < 0 for s in sets):
        groups = build(clusters[: max_groups - 1])
    return groups


def _agglomerate(co: np.ndarray, max_groups: int, min_similarity: float) -> list[list[int]]:
    """Merges tags (rows of the co-occurrence matrix) into groups; see the module docstring."""
    n = co.shape[0]
    vecs = co.copy()
    members: list[list[int]] = [[i] for i in range(n)]
    alive = np.ones(n, dtype=bool)

    def cosine_row(i: int) -> np.ndarray:
        norms = np.linalg.norm(vecs, axis=1)
        row = vecs @ vecs[i] / np.maximum(norms * norms[i], 1e-300)
        row[~alive] = -np.inf
        row[i] = -np.inf
        return row

    sim = np.full((n, n), -np.inf)
    for i in range(n):
        sim[i] = cosine_row(i)
    count = n
    while count > 1:
        flat = int(np.argmax(sim))
        i, j = divmod(flat, n)
        best = sim[i, j]
        if not (best > 0.0 and (best >= min_similarity or count > max_groups)):
            break
        i, j = min(i, j), max(i, j)
        vecs[i] += vecs[j]
        members[i] += members[j]
        members[j] = []
        alive[j] = False
        sim[j, :] = -np.inf
        sim[:, j] = -np.inf
        row = cosine_row(i)
        sim[i, :] = row
        sim[:, i] = row
        count -= 1
    return [m for m in members if m]
