"""`crs-load identity-quality`: how well the identity model tells people apart, on generated people
with known truth (loadtests/identity/people.py). docs/identity.md ("Quality") holds the figures.

The records are normalised as a bulk import does (parse_identity, strict=False: a bad attribute is
dropped) and clustered with the product's own code (server.identity.cluster: the same blocking keys,
model, rules and thresholds as online identification). Against the truth it reports

- pairwise precision, recall and F1 of the clusters (a pair of records is a *true pair* when both
  are the same person; a *predicted pair* when both land in one cluster);
- recall per duplicate variant kind: the share of duplicates of that kind clustered with their
  person's original record (which kinds of duplicate the model misses);
- false merges per hard-negative kind: the people merged with the person they resemble;
- candidate pairs scored per second (blocking, comparison and the model, one process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from loadtests.identity.people import NEGATIVES, VARIANTS, People, generate
from server.identity.attributes import Identity, parse_identity
from server.identity.cluster import candidate_pairs, cluster
from server.identity.model import MatchModel, Thresholds

PRECISION_GOAL = 0.99
RECALL_GOAL = 0.95


def normalise(people: People) -> list[Identity]:
    return [parse_identity({k: v for k, v in row.items() if k != "source_ref"}, strict=False)[0]
            for row in people.rows]


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


@dataclass
class Report:
    records: int
    people: int
    true_pairs: int
    predicted_pairs: int
    correct_pairs: int
    candidate_pairs: int
    possible_pairs: int
    seconds: float
    variant_recall: dict[str, tuple[int, int]]      # kind -> (found, of)
    negative_merges: dict[str, tuple[int, int]]     # kind -> (merged, of)

    @property
    def precision(self) -> float:
        return self.correct_pairs / self.predicted_pairs if self.predicted_pairs else 1.0

    @property
    def recall(self) -> float:
        return self.correct_pairs / self.true_pairs if self.true_pairs else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "people": self.people, "true_pairs": self.true_pairs,
                "predicted_pairs": self.predicted_pairs, "correct_pairs": self.correct_pairs,
                "precision": round(self.precision, 4), "recall": round(self.recall, 4), "f1": round(self.f1, 4),
                "candidate_pairs": self.candidate_pairs, "possible_pairs": self.possible_pairs,
                "pairs_per_second": round(self.candidate_pairs / self.seconds) if self.seconds else 0,
                "variant_recall": {k: {"found": f, "of": n} for k, (f, n) in self.variant_recall.items()},
                "negative_merges": {k: {"merged": m, "of": n} for k, (m, n) in self.negative_merges.items()}}


def evaluate(people: People, labels: list[int], *, candidates: int = 0, possible: int = 0,
             seconds: float = 0.0) -> Report:
    persons = [t.person for t in people.truth]
    true_pairs = sum(_pairs(n) for n in Counter(persons).values())
    by_cluster: dict[int, Counter[int]] = defaultdict(Counter)
    for label, person in zip(labels, persons, strict=True):
        by_cluster[label][person] += 1
    predicted = sum(_pairs(sum(c.values())) for c in by_cluster.values())
    correct = sum(_pairs(n) for c in by_cluster.values() for n in c.values())

    original: dict[int, int] = {}            # person -> row of its original record
    for row, t in enumerate(people.truth):
        if t.variant == "original":
            original[t.person] = row
    found: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for row, t in enumerate(people.truth):
        if t.variant != "original" and t.person in original:
            seen[t.variant] += 1
            found[t.variant] += labels[row] == labels[original[t.person]]

    clusters_of: dict[int, set[int]] = defaultdict(set)     # person -> its records' clusters
    for label, person in zip(labels, persons, strict=True):
        clusters_of[person].add(label)
    merged: Counter[str] = Counter()
    relations: Counter[str] = Counter()
    for pid, other, kind in people.negatives:
        if pid in clusters_of and other in clusters_of:
            relations[kind] += 1
            merged[kind] += bool(clusters_of[pid] & clusters_of[other])
    return Report(len(labels), len(clusters_of), true_pairs, predicted, correct, candidates, possible, seconds,
                  {k: (found[k], seen[k]) for k in VARIANTS if seen[k]},
                  {k: (merged[k], relations[k]) for k in NEGATIVES if relations[k]})


def run(records: int, seed: int, model: MatchModel, thresholds: Thresholds) -> Report:
    people = generate(records, seed)
    identities = normalise(people)
    started = time.perf_counter()
    clusters = cluster(identities, model, thresholds)
    seconds = time.perf_counter() - started
    return evaluate(people, clusters.labels, candidates=len(candidate_pairs(identities)),
                    possible=len(clusters.possible), seconds=seconds)


def format_report(r: Report, model: MatchModel, thresholds: Thresholds, seed: int) -> str:
    lines = [f"identity quality: {r.records} records, {r.people} people, seed {seed}, model {model.version}, "
             f"thresholds match {thresholds.match} review {thresholds.review}",
             f"  true pairs {r.true_pairs}, predicted {r.predicted_pairs}, correct {r.correct_pairs}",
             f"  precision {r.precision:.4f} (goal {PRECISION_GOAL})  recall {r.recall:.4f} (goal {RECALL_GOAL})  "
             f"F1 {r.f1:.4f}",
             f"  candidate pairs {r.candidate_pairs} in {r.seconds:.1f} s "
             f"({r.candidate_pairs / r.seconds if r.seconds else 0:.0f} pairs/s); {r.possible_pairs} for review",
             "  recall by duplicate kind:"]
    for kind, (found, of) in r.variant_recall.items():
        lines.append(f"    {kind:<18} {found / of:7.3f}  ({found}/{of})")
    lines.append("  false merges by hard-negative kind:")
    for kind, (merged, of) in r.negative_merges.items():
        lines.append(f"    {kind:<18} {merged:5d} of {of}")
    return "\n".join(lines)


def cmd_quality(args: argparse.Namespace) -> int:
    model = MatchModel.load(args.weights or None)
    thresholds = Thresholds(match=args.match, review=args.review)
    report = run(args.records, args.seed, model, thresholds)
    if args.json:
        print(json.dumps({"seed": args.seed, "model": model.version, **report.as_dict()}, indent=2))
    else:
        print(format_report(report, model, thresholds, args.seed))
    ok = report.precision >= PRECISION_GOAL and report.recall >= RECALL_GOAL
    if not ok:
        print("identity quality: below the goals", file=sys.stderr)
    return 0 if ok else 1


def register(subparsers: Any) -> argparse.ArgumentParser:
    defaults = Thresholds()
    p: argparse.ArgumentParser = subparsers.add_parser(
        "identity-quality", help="precision and recall of identity clustering on generated people",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 when precision >= 0.99 and recall >= 0.95, else 1.")
    p.add_argument("--records", type=int, default=20_000, help="records to generate (default 20000)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7; training uses other seeds)")
    p.add_argument("--weights", default="", help="a weights file (default: the packaged weights.json)")
    p.add_argument("--match", type=float, default=defaults.match, help=f"match threshold (default {defaults.match})")
    p.add_argument("--review", type=float, default=defaults.review,
                   help=f"review threshold (default {defaults.review})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_quality)
    return p
