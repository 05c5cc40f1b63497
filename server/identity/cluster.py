"""Clustering a batch of identities into people (pure): the in-memory twin of candidate search, for
records that are not in the database yet (a bulk import's file, the quality benchmark).

Same blocking keys, same model, same decision rules as online identification: pairs that share a
blocking key are scored once; pairs the model calls MATCH are joined, best first, unless the join
would put two records in one person that the rules forbid to MATCH (national ids of one type further
apart than a typo, given names or dates of birth that disagree outright): a chain A~B~C must not
merge two people through a third record that resembles both, such as a record without a date of
birth between a father and his son of the same name. Pairs that reach the review threshold but
are not joined come back as possible matches for the review queue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from server.identity.attributes import Identity
from server.identity.blocking import MAX_BLOCK, blocking_keys
from server.identity.compare import COMPARISONS
from server.identity.model import FORBID_MATCH_ON_ELSE, MatchModel, Score, Thresholds


@dataclass(frozen=True)
class Clusters:
    labels: list[int]                           # per input row: the index of its cluster's first row
    joined: list[tuple[int, int, Score]]        # the MATCH pairs that joined clusters, best first
    possible: list[tuple[int, int, Score]]      # pairs for review: review <= probability, not joined


def candidate_pairs(identities: Sequence[Identity]) -> set[tuple[int, int]]:
    blocks: dict[str, list[int]] = defaultdict(list)
    for i, identity in enumerate(identities):
        for key in blocking_keys(identity):
            blocks[key].append(i)
    pairs: set[tuple[int, int]] = set()
    for members in blocks.values():
        if 1 < len(members) <= MAX_BLOCK:
            pairs.update(combinations(members, 2))
    return pairs


def cluster(identities: Sequence[Identity], model: MatchModel, thresholds: Thresholds) -> Clusters:
    scored: list[tuple[int, int, Score]] = []
    for i, j in candidate_pairs(identities):
        s = model.score(identities[i], identities[j])
        if s.probability >= thresholds.review:
            scored.append((i, j, s))
    scored.sort(key=lambda t: (t[2].probability, t[2].match_weight), reverse=True)

    parent = list(range(len(identities)))
    members: dict[int, list[int]] = {i: [i] for i in range(len(identities))}     # per cluster root

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    joined: list[tuple[int, int, Score]] = []
    possible: list[tuple[int, int, Score]] = []
    for i, j, s in scored:
        ri, rj = root(i), root(j)
        if ri == rj:
            continue
        if s.probability >= thresholds.match and s.may_match \
                and not _conflict(identities, members[ri], members[rj]):
            keep, gone = min(ri, rj), max(ri, rj)
            parent[gone] = keep
            members[keep] += members.pop(gone)
            joined.append((i, j, s))
        else:
            possible.append((i, j, s))
    return Clusters([root(i) for i in range(len(identities))], joined, possible)


_RULES = tuple(COMPARISONS[attribute][0] for attribute in FORBID_MATCH_ON_ELSE)


def _conflict(identities: Sequence[Identity], a: list[int], b: list[int]) -> bool:
    """Joining clusters a and b would put two records in one person that a rule says are two people:
    national ids of one type further apart than a typo, or given names or dates of birth that
    disagree outright (a record that lacks the attribute must not chain a father to his son)."""
    return any(rule(identities[x], identities[y]) == "else" for x in a for y in b for rule in _RULES)
