"""How `crs shards` draws its answers as text: tables and lines from the reports, nothing gathered here.

Pure: values in, text out (server/topology/report.py gathers them; their JSON form is their `as_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from server.cli.render import percent, size, table
from shard_router.topology import ring_text

if TYPE_CHECKING:
    from server.topology.key_steps import StepStats
    from server.topology.report import PlanReport, StatusReport
    from server.topology.store import TopologyRecord


def status_text(r: StatusReport, out: TextIO) -> None:
    """`crs shards status`: the topology line, a row per shard, the live nodes, a move's progress, the draft."""
    p = r.publication
    where = r.stored_in + (f", published {p.at:%Y-%m-%d %H:%M:%S %Z} by {p.by} ({p.reason})" if p else "")
    if not r.version:
        where = f"not published yet: nodes run CRS_REDIS_SHARDS; {r.stored_in} is empty"
    phase = r.phase.value + (" (abort)" if r.aborting else "")
    out.write(f"Topology version {r.version} — {phase} — {where}\n")
    if not r.stable:
        out.write(f"  moving keys from {r.source_ring} to {r.ring}\n")
    out.write("\n")
    rows: list[list[object]] = [["SHARD", "STATE", "ADDRESS", "WEIGHT", "SHARE", "KEYS", "MEMORY", "HIT RATIO",
                                 "ERRORS", "DOWN ON"]]
    for s in r.shards:
        share = percent(s.share) if r.stable else f"{percent(s.source_share)} -> {percent(s.share)}"
        st = s.stats
        rows.append([s.name, s.state, s.address, s.weight, share,
                     f"{st.keys:,}" if st else s.error, size(st.memory_bytes) if st else "-",
                     percent(st.hit_ratio if st else None), s.node_errors,
                     f"{s.down_on_nodes} node(s)" if s.down_on_nodes else "-"])
        for c in s.replicas:   # a replica: same shard, same keys expected; not part of placement
            cs = c.stats
            rows.append([f"  {c.label}", "write-only" if c.write_only else "", c.address, "", "",
                         f"{cs.keys:,}" if cs else c.error, size(cs.memory_bytes) if cs else "-",
                         percent(cs.hit_ratio if cs else None), "", ""])
    table(rows, out)
    out.write(f"\nNodes: {len(r.nodes)} live (heartbeat within CRS_TOPOLOGY_LEASE = {r.lease:g}s)\n")
    if r.nodes:
        table([["NODE", "ADDRESS", "VERSION", "PHASE", "SHARDS DOWN", "SEEN"]]
              + [[n.node_id, n.address, n.topology_version, n.phase, ",".join(n.shards_down) or "-",
                  f"{n.age_s:.1f}s ago"] for n in r.nodes], out)
        if r.node_versions == [r.version]:
            out.write(f"All live nodes run version {r.version}.\n")
        else:
            out.write(f"Nodes run versions {', '.join(map(str, r.node_versions))};"
                      f" the topology in force is {r.version}.\n")
    for step, shards in r.progress.items():
        examined = sum(pr.scanned for pr in shards.values())
        moved = sum(pr.moved for pr in shards.values())
        finished = all(pr.done for pr in shards.values())
        out.write(f"\n{step} step of version {r.version}: {examined:,} keys examined, {moved:,}"
                  f" {'copied' if step == 'copy' else 'deleted'}{' (done)' if finished else ''}\n")
    if r.draft is not None:
        out.write(f"\nStaged change (against version {r.draft.base_version}), not applied:\n")
        for change in r.draft.changes:
            out.write(f"  {change}\n")
        out.write("  next: crs shards plan, then crs shards apply (or crs shards abort to discard it)\n")


def nothing_to_plan_text(version: int, out: TextIO) -> None:
    out.write(f"topology version {version} is stable and no change is staged: nothing to plan"
              " (stage one with crs shards add/remove/reweight)\n")


def plan_text(r: PlanReport, out: TextIO) -> None:
    """`crs shards plan`: per shard before -> after, the totals, who sends how many keys to whom."""
    plan, before, after = r.plan, r.weights_before, r.weights_after
    out.write(f"Plan for the {r.what}\n\n")
    rows: list[list[object]] = [["SHARD", "WEIGHT", "SHARE", "KEYS NOW", "LOSES", "GAINS", "KEYS AFTER",
                                 "BYTES NOW", "LOSES", "GAINS", "BYTES AFTER"]]
    for name, m in plan.shards.items():
        wb, wa = before.get(name), after.get(name)
        weight = f"{wb if wb is not None else '-'} -> {wa if wa is not None else '-'}" if wb != wa else str(wb)
        rows.append([name, weight, f"{percent(m.share_before)} -> {percent(m.share_after)}",
                     f"{m.keys_before:,.0f}", f"-{m.keys_out:,.0f}", f"+{m.keys_in:,.0f}", f"{m.keys_after:,.0f}",
                     size(m.bytes_before), f"-{size(m.bytes_out)}", f"+{size(m.bytes_in)}",
                     size(m.bytes_after)])
    table(rows, out)
    how = "every key examined" if plan.exact else f"extrapolated from up to {r.sample:,} keys per shard"
    out.write(f"\nMoves {plan.keys_moving:,.0f} of {plan.keys_total:,.0f} keys ({percent(plan.key_fraction)}),"
              f" {size(plan.bytes_moving)} of {size(plan.bytes_total)} ({how});"
              f" {percent(plan.hash_fraction)} of the hash space changes owner.\n")
    if plan.pairs:
        out.write("From -> to:\n")
        for (a, b), n in sorted(plan.pairs.items(), key=lambda kv: -kv[1]):
            out.write(f"  {a} -> {b}: {n:,.0f} keys\n")
    between_old = sum(n for (_, b), n in plan.pairs.items() if b in before)
    if between_old and any(name not in before for name in after):
        out.write(f"Note: {between_old:,.0f} keys move between shards that stay (ketama float32 point"
                  " counts, see docs/ring.md).\n")


def staged_text(version: int, changes: Sequence[object], fraction: float, out: TextIO) -> None:
    """`crs shards add/remove/reweight`: the draft as it now stands and the share of the hash space it moves."""
    out.write(f"Staged change against topology version {version} (not applied):\n")
    for change in changes:
        out.write(f"  {change}\n")
    out.write(f"{percent(fraction)} of the hash space would change owner."
              " Next: crs shards plan (count keys and bytes), crs shards apply; crs shards abort discards it.\n")


def steps_text(stats: Sequence[StepStats], out: TextIO) -> None:
    """After `crs shards apply/abort` (even a failed one): what each copy/cleanup step did."""
    for st in stats:
        verb = "copied" if st.step == "copy" else "deleted"
        why = " (already on the new owner, expired, or not this shard's)" if st.skipped else ""
        out.write(f"  {st.step}: {st.scanned:,} keys examined, {st.moved:,} {verb}, {st.skipped:,} skipped{why}"
                  f" in {st.seconds:.1f}s\n")


def history_text(records: Sequence[TopologyRecord], out: TextIO) -> None:
    """`crs shards history`: one row per version, newest first."""
    if not records:
        out.write("no topology published yet (nodes run CRS_REDIS_SHARDS)\n")
        return
    rows: list[list[object]] = [["VERSION", "PHASE", "TARGET RING", "PUBLISHED", "BY", "REASON"]]
    for r in records:
        phase = r.topology.phase.value + (" (abort)" if r.topology.aborting else "")
        rows.append([r.topology.version, phase, ring_text(r.topology.target_specs),
                     f"{r.created_at:%Y-%m-%d %H:%M:%S}", r.created_by, r.reason])
    table(rows, out)
