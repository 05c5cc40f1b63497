"""Clustering a batch of identities into people (pure): the in-memory twin of candidate search, for
records that are not in the database yet (a bulk import's file, the quality benchmark).

Same blocking keys, same model, same decision rules as online identification: pairs that share a
blocking key are scored once; pairs the model calls MATCH are joined, best first, unless the join
would put two records in one person that the rules forbid to MATCH (national ids of one type further
apart than a typo, given names or dates of birth that disagree outright): a chain A~B~C must not
merge two people through a third record that resembles both, such as a record without a date of
birth between a father and his son of the same name.

A record whose MATCH pairs reach two records that the rules call two people (the undated record of
a father or his son, same name and address, matching both) is *ambiguous*: it is joined to neither
and its pairs go to review, as online identification answers POSSIBLE_MATCH for two customers above
the match threshold. Unless one side is clearly stronger: when its best pair outweighs every pair
to a record in conflict with that best one by `AMBIGUITY_MARGIN` bits (the son's own phone and email
as well as his name and address), it joins the stronger side as usual. Pairs that reach the review
threshold but are not joined come back as possible matches for the review queue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from server.identity.attributes import Identity
from server.identity.blocking import MAX_BLOCK, blocking_keys
from server.identity.model import MatchModel, Score, Thresholds, rules_forbid

# Match-weight bits by which a record's best MATCH pair must beat its pairs to a conflicting record
# for the record to join the best one's side rather than be held back for review.
AMBIGUITY_MARGIN = 10.0


@dataclass(frozen=True)
class Clusters:
    labels: list[int]                           # per input row: the index of its cluster's first row
    joined: list[tuple[int, int, Score]]        # the MATCH pairs that joined clusters, best first
    possible: list[tuple[int, int, Score]]      # pairs for review: review <= probability, not joined


def candidate_pairs(identities: Sequence[Identity], keys: Sequence[Sequence[str]] | None = None
                    ) -> set[tuple[int, int]]:
    """Pairs sharing a blocking key (`keys`: each identity's blocking_keys when the caller has them)."""
    blocks: dict[str, list[int]] = defaultdict(list)
    for i, identity in enumerate(identities):
        for key in blocking_keys(identity) if keys is None else keys[i]:
            blocks[key].append(i)
    pairs: set[tuple[int, int]] = set()
    for members in blocks.values():
        if 1 < len(members) <= MAX_BLOCK:
            pairs.update(combinations(members, 2))
    return pairs


def cluster(identities: Sequence[Identity], model: MatchModel, thresholds: Thresholds,
            margin: float = AMBIGUITY_MARGIN, keys: Sequence[Sequence[str]] | None = None) -> Clusters:
    """Rows with the same attributes are one person when the model MATCHes such a row with itself:
    they join the first of them before blocking. Otherwise a source system's thousands of records of
    one person filled every block of theirs past MAX_BLOCK, and each became a customer of its own (a
    file of 3,000 made 3,000 customers and no review task; docs/audit-2026-12-04.md, "Twentieth audit")."""
    first: dict[Identity, int] = {}
    twins: list[tuple[int, int, Score]] = []    # (first row, a later row with its attributes, their score)
    own: dict[Identity, Score] = {}
    for i, identity in enumerate(identities):
        j = first.setdefault(identity, i)
        if j != i:
            if identity not in own:
                own[identity] = model.score(identity, identity)
            s = own[identity]
            if s.probability >= thresholds.match and s.may_match:
                twins.append((j, i, s))
    if not twins:
        return _cluster(identities, model, thresholds, margin, keys)
    gone = {i for _, i, _ in twins}
    kept = [i for i in range(len(identities)) if i not in gone]
    inner = _cluster([identities[i] for i in kept], model, thresholds, margin,
                     None if keys is None else [keys[i] for i in kept])
    label = {i: kept[inner.labels[n]] for n, i in enumerate(kept)}
    for j, i, _ in twins:
        label[i] = label[j]
    return Clusters([label[i] for i in range(len(identities))],
                    [(kept[a], kept[b], s) for a, b, s in inner.joined] + twins,
                    [(kept[a], kept[b], s) for a, b, s in inner.possible])


def _cluster(identities: Sequence[Identity], model: MatchModel, thresholds: Thresholds, margin: float,
             keys: Sequence[Sequence[str]] | None) -> Clusters:
    scored: list[tuple[int, int, Score]] = []
    for i, j in candidate_pairs(identities, keys):
        s = model.score(identities[i], identities[j])
        if s.probability >= thresholds.review:
            scored.append((i, j, s))
    scored.sort(key=lambda t: (t[2].probability, t[2].match_weight), reverse=True)
    held = ambiguous(identities, scored, thresholds, margin)

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
        if s.probability >= thresholds.match and s.may_match and i not in held and j not in held \
                and not _conflict(identities, members[ri], members[rj]):
            keep, gone = min(ri, rj), max(ri, rj)
            parent[gone] = keep
            members[keep] += members.pop(gone)
            joined.append((i, j, s))
        else:
            possible.append((i, j, s))
    return Clusters([root(i) for i in range(len(identities))], joined, possible)


def ambiguous(identities: Sequence[Identity], scored: Sequence[tuple[int, int, Score]], thresholds: Thresholds,
              margin: float = AMBIGUITY_MARGIN) -> set[int]:
    """The records whose MATCH pairs reach two records that a rule calls two people, and whose best
    such pair does not outweigh every pair to a record in conflict with it by `margin` bits."""
    matches: dict[int, list[tuple[float, int]]] = defaultdict(list)     # record -> (weight, other)
    for i, j, s in scored:
        if s.probability >= thresholds.match and s.may_match:
            matches[i].append((s.match_weight, j))
            matches[j].append((s.match_weight, i))
    held: set[int] = set()
    for i, pairs in matches.items():
        if len(pairs) < 2 or identities[i].date_of_birth or identities[i].national_id:
            continue        # a date of birth or national id tells its people apart by the rules
        pairs.sort(reverse=True)
        best_weight, best = pairs[0]
        for (_, x), (wy, y) in combinations(pairs, 2):
            if rules_forbid(identities[x], identities[y]):
                if x == best and best_weight - wy >= margin:
                    continue        # the best side is clearly stronger than this rival
                held.add(i)
                break
    return held


def _conflict(identities: Sequence[Identity], a: list[int], b: list[int]) -> bool:
    """Joining clusters a and b would put two records in one person that a rule says are two people:
    national ids of one type further apart than a typo, or given names or dates of birth that
    disagree outright (a record that lacks the attribute must not chain a father to his son)."""
    return any(rules_forbid(identities[x], identities[y]) for x in a for y in b)
