"""Generate the monitoring files from one source (this module): the SLO rules and alerts, and the dashboard.

    python -m scripts.monitoring_manifests           # rewrite the four files
    python -m scripts.monitoring_manifests --check   # exit 1 if a committed file differs (tests do this too)

Writes:
  monitoring/crs-rules.yaml                  Prometheus rule file (promtool check rules / rule_files:)
  k8s/monitoring/crs-prometheusrule.yaml     the same groups as a monitoring.coreos.com/v1 PrometheusRule
  k8s/monitoring/crs-dashboard.json          Grafana dashboard (import it, or ...)
  k8s/monitoring/crs-dashboard-configmap.yaml  ... the same as a ConfigMap for Grafana's dashboard sidecar

The objectives, windows and burn rates are explained in docs/slo.md; each alert's runbook is
docs/runbooks/<name>.md. Edit here, regenerate, commit the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from server import rpc

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = ROOT / "monitoring" / "crs-rules.yaml"
PROMETHEUS_RULE = ROOT / "k8s" / "monitoring" / "crs-prometheusrule.yaml"
DASHBOARD = ROOT / "k8s" / "monitoring" / "crs-dashboard.json"
DASHBOARD_CONFIGMAP = ROOT / "k8s" / "monitoring" / "crs-dashboard-configmap.yaml"

# Where alert notifications link to. Point it at where your copy of this repository is browsable.
RUNBOOK_BASE = "https://git.example.com/crs-lookup/blob/main/docs/runbooks/"

# gRPC codes that are the service's fault (docs/slo.md "Good and bad events"). Everything else a
# node answers (OK, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, ALREADY_EXISTS,
# FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, RESOURCE_EXHAUSTED, CANCELLED) is a good event.
BAD_CODES = ("UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED")
BAD = "|".join(BAD_CODES)


def _methods(service: Any, only: tuple[str, ...] = ()) -> str:
    names = [n for n in rpc.methods(service) if not only or n in only]
    assert names and (not only or len(names) == len(only)), f"{service.full_name}: unknown methods in {only}"
    return "|".join(names)


# service label -> (methods regex, availability objective). ChangeFeedService counts Snapshot only:
# every Watch ends with a non-OK status by design (a drain ends it UNAVAILABLE and the client
# resumes), so its freshness is watched by CRSFeedHeadLagging instead (docs/slo.md).
AVAILABILITY: dict[str, tuple[str, float]] = {
    "LookupService": (_methods(rpc.LOOKUP_SERVICE), 0.99999),
    "AdminService": (_methods(rpc.ADMIN_SERVICE), 0.9995),
    "IdentityService": (_methods(rpc.IDENTITY_SERVICE), 0.9995),
    "ChangeFeedService": (_methods(rpc.FEED_SERVICE, ("Snapshot",)), 0.999),
}
# Latency: unary lookups only (StreamResolve's histogram entry is the whole stream's life,
# BatchResolve's a batch of up to CRS_BATCH_MAX keys), answered OK, within LATENCY_BOUND seconds.
LATENCY_METHODS = _methods(rpc.LOOKUP_SERVICE, ("ResolveCard", "ResolveAccount", "GetCustomer", "ResolveBin"))
LATENCY_BOUND = "0.025"          # a bucket bound of server/metrics.py _LATENCY_BUCKETS
LATENCY_OBJECTIVE = 0.999
AVAILABILITY_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
LATENCY_WINDOWS = ("5m", "30m", "1h", "6h")
# (severity, long window, short window, burn rate): the Google SRE workbook's multiwindow,
# multi-burn-rate alerts for a 30-day SLO period (docs/slo.md "Alerts").
BURN_ALERTS = (
    ("page", "1h", "5m", 14.4),     # 2% of the monthly budget in 1 hour
    ("page", "6h", "30m", 6.0),     # 5% in 6 hours
    ("ticket", "1d", "2h", 3.0),    # 10% in 1 day
    ("ticket", "3d", "6h", 1.0),    # 10% in 3 days
)
LATENCY_BURN_ALERTS = BURN_ALERTS[:2]


def _num(x: float) -> str:
    return format(x, "g") if x >= 1e-4 else f"{x:.10f}".rstrip("0")


def _alert(name: str, expr: str, *, for_: str, severity: str, summary: str, description: str,
           **labels: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, **labels},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{RUNBOOK_BASE}{_runbook(name)}",
        },
    }


def _runbook(alert: str) -> str:
    """CRSCacheShardDown -> crs-cache-shard-down.md"""
    out = "".join("-" + c.lower() if c.isupper() else c for c in alert.removeprefix("CRS"))
    return "crs" + out + ".md"


def sli_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for service, (methods, objective) in AVAILABILITY.items():
        labels = {"service": service, "slo": "availability"}
        rules.append({"record": "crs:slo_error_budget:ratio", "expr": f"vector({_num(1 - objective)})",
                      "labels": labels})
        for w in AVAILABILITY_WINDOWS:
            calls = f'crs_rpc_latency_seconds_count{{method=~"{methods}"}}'
            bad = f'crs_rpc_latency_seconds_count{{method=~"{methods}",code=~"{BAD}"}}'
            # `or vector(0)`: no bad call yet is a ratio of 0, not an empty result.
            rules.append({"record": f"crs:slo_errors_per_request:ratio_rate{w}",
                          "expr": f"(sum(rate({bad}[{w}])) or vector(0))\n/\nsum(rate({calls}[{w}]))",
                          "labels": labels})
    labels = {"service": "LookupService", "slo": "latency"}
    rules.append({"record": "crs:slo_error_budget:ratio", "expr": f"vector({_num(1 - LATENCY_OBJECTIVE)})",
                  "labels": labels})
    for w in LATENCY_WINDOWS:
        fast = f'crs_rpc_latency_seconds_bucket{{method=~"{LATENCY_METHODS}",code="OK",le="{LATENCY_BOUND}"}}'
        calls = f'crs_rpc_latency_seconds_count{{method=~"{LATENCY_METHODS}",code="OK"}}'
        rules.append({"record": f"crs:slo_errors_per_request:ratio_rate{w}",
                      "expr": f"1 - (sum(rate({fast}[{w}])) / sum(rate({calls}[{w}])))", "labels": labels})
    return rules


def _burn(slo: str, alerts: tuple[tuple[str, str, str, float], ...], name: str, what: str) -> list[dict[str, Any]]:
    out = []
    for severity, long_w, short_w, rate in alerts:
        def over(w: str, rate: float = rate) -> str:
            return (f'crs:slo_errors_per_request:ratio_rate{w}{{slo="{slo}"}}\n'
                    f'  > on (service, slo) ({_num(rate)} * crs:slo_error_budget:ratio{{slo="{slo}"}})')
        out.append(_alert(
            name, f"(\n  {over(long_w)}\n)\nand on (service, slo)\n(\n  {over(short_w)}\n)",
            for_="1m", severity=severity, long_window=long_w, short_window=short_w, burn_rate=_num(rate),
            summary=f"{{{{ $labels.service }}}} is burning its {what} error budget {_num(rate)}x too fast "
                    f"(over {long_w} and {short_w})",
            description=(f"{what.capitalize()} SLO of {{{{ $labels.service }}}}: the share of bad calls over {long_w} "
                         f"and over {short_w} is above {_num(rate)} x the budget "
                         f"({{{{ $value | humanizePercentage }}}} over {long_w}). "
                         f"At this rate the 30-day budget lasts {_num(30 / rate)} days.")))
    return out


def component_alerts() -> list[dict[str, Any]]:
    return [
        # Every other alert reads node metrics: with none scraped they all stay silent, lookups failing or not.
        _alert("CRSNodeMetricsAbsent",
               "absent(crs_database_up)",
               for_="5m", severity="page",
               summary="No CRS node has been scraped for 5 minutes: every other CRS alert is blind",
               description="Either no node runs (every lookup fails) or Prometheus cannot scrape them (the "
                           "ServiceMonitor, a NetworkPolicy, the metrics port)."),
        _alert("CRSCacheShardDown",
               'min by (job, shard) (crs_cache_shard_up) == 0\n'
               'unless on (job, shard)\n'
               'max by (job, shard) (crs_cache_shard_state{state="down"}) == 1',
               for_="2m", severity="ticket",
               summary="Redis shard {{ $labels.shard }} is down on at least one node",
               description="Nodes' circuit breaker has taken {{ $labels.shard }} out for 2 minutes (not an "
                           "operator's `crs shards mark`). Its keys are answered from PostgreSQL meanwhile."),
        _alert("CRSCacheCopyDown",
               'min by (job, shard, copy) (crs_cache_copy_up) == 0\n'
               'unless on (job, shard)\n'
               'min by (job, shard) (crs_cache_shard_up) == 0',
               for_="5m", severity="ticket",
               summary="Copy {{ $labels.copy }} of Redis shard {{ $labels.shard }} is down; its siblings serve",
               description="No lookup fails and PostgreSQL sees no extra load while another copy of the shard "
                           "serves, but the shard has lost its redundancy: one more failure sends its keys to "
                           "PostgreSQL."),
        _alert("CRSCacheShardErrors",
               "sum by (job, shard) (rate(crs_cache_shard_errors_total[5m])) > 1\n"
               "or\n"
               "sum by (job, shard) (rate(crs_cache_reply_errors_total[5m])) > 0.1",
               for_="10m", severity="ticket",
               summary="Redis shard {{ $labels.shard }} is failing operations ({{ $value | humanize }}/s)",
               description="Failed or error-replied Redis commands on {{ $labels.shard }} for 10 minutes."),
        _alert("CRSOutboxBacklog",
               "max by (job) (crs_outbox_oldest_unsettled_age_seconds) > 60\n"
               "or\n"
               "max by (job) (crs_outbox_unsettled) > 10000",
               for_="5m", severity="ticket",
               summary="Outbox rows wait to be settled (oldest {{ $value | humanizeDuration }} or count)",
               description="The relay is not invalidating caches after writes: answers may be stale for up "
                           "to CRS_CACHE_TTL after a write."),
        _alert("CRSTopologyNodeBehind",
               "crs:topology_version_behind:versions > 0\n"
               "or\n"
               "time() - crs_topology_confirmed_timestamp_seconds > 30",
               for_="2m", severity="ticket",
               summary="{{ $labels.instance }} runs an older shard topology or has stopped checking it",
               description="A node on an older topology version stalls `crs shards apply`; one that cannot "
                           "read the topology stops filling Redis after CRS_TOPOLOGY_LEASE."),
        _alert("CRSPostgresPoolSaturated",
               "crs:pg_pool_utilization:ratio > 0.9",
               for_="5m", severity="ticket",
               summary="{{ $labels.instance }} uses {{ $value | humanizePercentage }} of its PostgreSQL pools",
               description="Cache misses and writes queue for a connection and then time out "
                           "(DEADLINE_EXCEEDED / UNAVAILABLE)."),
        _alert("CRSNodeShedding",
               "sum by (instance) (rate(crs_calls_shed_total[5m])) > 0",
               for_="5m", severity="ticket",
               summary="{{ $labels.instance }} refuses {{ $value | humanize }} calls/s unanswered: it is over its"
                       " capacity",
               description="Its gRPC threads have a queue that stays (CRS_SHED_QUEUE_MS); calls past it are "
                           "refused UNAVAILABLE at once and clients retry on another node."),
        _alert("CRSDatabaseUnreachable",
               "min by (instance) (crs_database_up) == 0",
               for_="1m", severity="page",
               summary="{{ $labels.instance }} cannot reach PostgreSQL (health crs.v1.Database NOT_SERVING)",
               description="Cached lookups still answer; cache misses, writes, identity and the change feed "
                           "fail UNAVAILABLE until PostgreSQL answers again."),
        _alert("CRSPostgresReplicaBehind",
               "max by (instance) (crs_pg_replica_staleness_seconds) > 1",
               for_="5m", severity="ticket",
               summary="{{ $labels.instance }}: the PostgreSQL read replica is {{ $value | humanizeDuration }}"
                       " behind the primary",
               description="Cache misses read the primary instead (crs_pg_reads_total route"
                           " primary_replica_behind): answers stay fresh, but the primary carries the read load"
                           " the replica should."),
        _alert("CRSFeedHeadLagging",
               "(crs:feed_head_lag:sequences > 0 and changes(crs_feed_head_sequence[5m]) == 0)\n"
               "or\n"
               "crs:feed_head_lag:sequences > 10000",
               for_="5m", severity="ticket",
               summary="{{ $labels.instance }} is {{ $value }} change-feed events behind the other nodes",
               description="Its Watch streams deliver late; a watcher further behind than CRS_FEED_QUEUE_SIZE "
                           "reads on from PostgreSQL (crs_feed_watchers_catching_up)."),
        _alert("CRSBinTableVersionSkew",
               "max by (job) (crs_bin_table_version) != min by (job) (crs_bin_table_version)",
               for_="5m", severity="ticket",
               summary="Nodes answer from different BIN table versions",
               description="ResolveBin (and BIN-derived decision hints) differ by node for the same PAN."),
        _alert("CRSCertificateExpiry",
               "crs_tls_certificate_expiry_timestamp_seconds - time() < 14 * 86400",
               for_="10m", severity="ticket",
               summary="{{ $labels.instance }} serves a TLS certificate that expires in "
                       "{{ $value | humanizeDuration }}",
               description="Nodes read the certificate at start: renew it, then restart the pods."),
        _alert("CRSCertificateExpiry",
               "crs_tls_certificate_expiry_timestamp_seconds - time() < 3 * 86400",
               for_="10m", severity="page",
               summary="{{ $labels.instance }} serves a TLS certificate that expires in "
                       "{{ $value | humanizeDuration }}",
               description="Every client call fails once it has expired. Nodes read it at start: renew it, "
                           "then restart the pods."),
    ]


def component_records() -> list[dict[str, Any]]:
    return [
        {"record": "crs:topology_version_behind:versions",
         "expr": "max by (job) (crs_topology_version)\n- on (job) group_right\ncrs_topology_version"},
        {"record": "crs:feed_head_lag:sequences",
         "expr": "max by (job) (crs_feed_head_sequence)\n- on (job) group_right\ncrs_feed_head_sequence"},
        {"record": "crs:pg_pool_utilization:ratio",
         "expr": "(crs_pg_pool_connections - crs_pg_pool_idle_connections) / crs_pg_pool_max_connections"},
    ]


def rule_groups() -> dict[str, Any]:
    return {"groups": [
        {"name": "crs-slo-sli", "interval": "30s", "rules": sli_rules()},
        {"name": "crs-slo-alerts", "rules": [
            *_burn("availability", BURN_ALERTS, "CRSErrorBudgetBurn", "availability"),
            *_burn("latency", LATENCY_BURN_ALERTS, "CRSLatencyBudgetBurn", "latency"),
        ]},
        {"name": "crs-components", "rules": [*component_records(), *component_alerts()]},
    ]}


# --- dashboard --------------------------------------------------------------------------------

_DS = {"type": "prometheus", "uid": "${datasource}"}
J = 'job=~"$job"'


def _panel(title: str, targets: list[tuple[str, str]], *, unit: str = "short", x: int, y: int, w: int = 12,
           h: int = 8, description: str = "") -> dict[str, Any]:
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": _DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": _DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }


def _row(title: str, y: int) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def dashboard() -> dict[str, Any]:
    rate = "[$__rate_interval]"
    calls = f"crs_rpc_latency_seconds_count{{{J}}}"
    rows: list[tuple[str, list[tuple[str, list[tuple[str, str]], str, str]]]] = [
        ("SLOs (recording rules of monitoring/crs-rules.yaml)", [
            ("Availability burn rate, 1h (page at 14.4)",
             [("crs:slo_errors_per_request:ratio_rate1h / on (service, slo) crs:slo_error_budget:ratio",
               "{{service}} {{slo}}")], "short", "1 = spending the 30-day budget exactly; 14.4 pages."),
            ("Availability burn rate, 3d (ticket at 1)",
             [('crs:slo_errors_per_request:ratio_rate3d{slo="availability"}'
               " / on (service, slo) crs:slo_error_budget:ratio", "{{service}}")], "short", ""),
        ]),
        ("Golden signals per RPC", [
            ("Calls/s by method", [(f"sum by (method) (rate({calls}{rate}))", "{{method}}")], "reqps", ""),
            ("Service errors/s (bad codes) by method and code",
             [(f'sum by (method, code) (rate(crs_rpc_latency_seconds_count{{{J},code=~"{BAD}"}}{rate}))',
               "{{method}} {{code}}")], "reqps", "Codes that spend the error budget (docs/slo.md)."),
            ("Caller errors/s (not the service's fault) by code",
             [(f'sum by (method, code) (rate(crs_rpc_latency_seconds_count{{{J},code!="OK",code!~"{BAD}"}}'
               f'{rate}))', "{{method}} {{code}}")], "reqps", "INVALID_ARGUMENT, NOT_FOUND, ... A jump still "
                                                               "deserves a look (a client release, a quota)."),
            ("Latency p50 by method (OK calls)",
             [(f'histogram_quantile(0.5, sum by (method, le) (rate(crs_rpc_latency_seconds_bucket{{{J},code="OK"}}'
               f'{rate})))', "{{method}}")], "s", "Server-side handling time, network excluded."),
            ("Latency p99 by method (OK calls)",
             [(f'histogram_quantile(0.99, sum by (method, le) (rate(crs_rpc_latency_seconds_bucket{{{J},code="OK"}}'
               f'{rate})))', "{{method}}")], "s", "StreamResolve/Watch: the whole stream's life."),
            ("Calls refused over capacity/s by pod and method",
             [(f"sum by (instance, method) (rate(crs_calls_shed_total{{{J}}}{rate}))", "{{instance}} {{method}}")],
             "reqps", "Refused UNAVAILABLE before any work: they waited for a gRPC thread behind a queue that "
                      "stayed (CRS_SHED_QUEUE_MS; CRSNodeShedding). Clients retry them on another node."),
            ("Calls queued for a gRPC thread, and waiting on the event loop, by pod",
             [(f"sum by (instance) (crs_grpc_calls_queued{{{J}}})", "{{instance}} queued"),
              (f"sum by (instance) (crs_grpc_calls_on_loop{{{J}}})", "{{instance}} on the loop"),
              (f"sum by (instance) (increase(crs_grpc_turns_revoked_total{{{J}}}{rate}))",
               "{{instance}} turns taken from calls without their message"),
              (f"sum by (instance) (increase(crs_grpc_calls_closed_without_message_total{{{J}}}{rate}))",
               "{{instance}} calls closed without their message")],
             "short", "Hybrid nodes, sampled each second. Queued: not yet taken by one of CRS_SERVING_ACTIVE "
                      "threads (a queue that stays is shed). On the loop: misses, PostgreSQL and admin calls "
                      "waiting; at 3/4 of CRS_SERVING_THREADS per process more are refused. Turns taken: "
                      "calls that held a thread for 100 ms without their request message while calls "
                      "queued. Closed: such calls ended UNAVAILABLE after CRS_MESSAGE_WAIT_MS, or 100 ms "
                      "while calls waited for a thread (a client that opens calls and sends nothing: "
                      "CRSNodeShedding step 5)."),
        ]),
        ("Tier that answered", [
            ("Keys answered/s by tier", [(f"sum by (tier) (rate(crs_lookups_total{{{J}}}{rate}))", "{{tier}}")],
             "reqps", "l1 near-cache, coalesced (joined a load in flight), l2 Redis, l3 PostgreSQL, "
                      "l3_negative (PostgreSQL: no such key)."),
            ("Share of keys by tier",
             [(f"sum by (tier) (rate(crs_lookups_total{{{J}}}{rate}))"
               f" / ignoring (tier) group_left sum(rate(crs_lookups_total{{{J}}}{rate}))", "{{tier}}")],
             "percentunit", ""),
        ]),
        ("Redis shards", [
            ("Shard up (min over nodes)", [(f"min by (shard) (crs_cache_shard_up{{{J}}})", "{{shard}}")], "short",
             "0 = a node's circuit breaker has the shard out."),
            ("Shard errors/s", [(f"sum by (shard) (rate(crs_cache_shard_errors_total{{{J}}}{rate}))",
                                 "{{shard}} failed"),
                                (f"sum by (shard) (rate(crs_cache_reply_errors_total{{{J}}}{rate}))",
                                 "{{shard}} error reply")], "reqps", ""),
            ("Hit ratio by shard", [(f"max by (shard) (crs_cache_shard_hit_ratio{{{J}}})", "{{shard}}")],
             "percentunit", "Redis keyspace hits / (hits + misses) since the shard started."),
            ("Keys and memory by shard", [(f"max by (shard) (crs_cache_shard_keys{{{J}}})", "{{shard}} keys"),
                                          (f"max by (shard) (crs_cache_shard_memory_bytes{{{J}}})",
                                           "{{shard}} bytes")], "short", ""),
            ("Shard state and share of the ring",
             [(f"max by (shard, state) (crs_cache_shard_state{{{J}}}) == 1", "{{shard}} {{state}}"),
              (f"max by (shard) (crs_cache_shard_share{{{J}}})", "{{shard}} share")], "short", ""),
            ("Keys copied by reads during a move/s",
             [(f"sum(rate(crs_cache_migration_copies_total{{{J}}}{rate}))", "copies")], "reqps", ""),
            ("Shard copies up (min over nodes)",
             [(f"min by (shard, copy) (crs_cache_copy_up{{{J}}})", "{{shard}} {{copy}}")], "short",
             "Primary and replicas of each shard; 0 = out, its siblings serve (CRSCacheCopyDown)."),
            ("Copy errors/s", [(f"sum by (shard, copy) (rate(crs_cache_copy_errors_total{{{J}}}{rate}))",
                                "{{shard}} {{copy}}")], "reqps", ""),
        ]),
        ("Topology", [
            ("PostgreSQL reachable (crs.v1.Database health)",
             [(f"min by (instance) (crs_database_up{{{J}}})", "{{instance}}")], "short",
             "0 = the node's SELECT 1 fails: misses and writes fail, cached keys still answer."),
            ("Topology version per node", [(f"crs_topology_version{{{J}}}", "{{instance}}")], "none",
             "Every node should show the same version (docs/runbooks/resharding.md)."),
            ("Topology phase per node", [(f"crs_topology_phase{{{J}}} == 1", "{{instance}} {{phase}}")], "none", ""),
            ("Seconds since each node checked the topology",
             [(f"time() - crs_topology_confirmed_timestamp_seconds{{{J}}}", "{{instance}}")], "s", ""),
        ]),
        ("Outbox and PostgreSQL", [
            ("Outbox: unsettled rows and oldest age",
             [(f"max(crs_outbox_unsettled{{{J}}})", "unsettled rows"),
              (f"max(crs_outbox_oldest_unsettled_age_seconds{{{J}}})", "oldest age (s)")], "short", ""),
            ("Cache-miss reads by route/s (CRS_PG_READ_DSN)",
             [(f"sum by (route) (rate(crs_pg_reads_total{{{J}}}{rate}))", "{{route}}")], "reqps",
             "replica = answered and cached from a standby; primary_replica_behind = the standby could not show"
             " it was fresh; replica_uncached = the primary was out, served uncached."),
            ("Read replica staleness per node",
             [(f"max by (instance) (crs_pg_replica_staleness_seconds{{{J}}})", "{{instance}}")], "s",
             "Age of the newest primary position the standby has replayed (CRSPostgresReplicaBehind > 1 s)."),
            ("PostgreSQL pool use per pod",
             [(f"crs_pg_pool_connections{{{J}}} - crs_pg_pool_idle_connections{{{J}}}", "{{instance}} in use"),
              (f"crs_pg_pool_max_connections{{{J}}}", "{{instance}} max")], "short", ""),
        ]),
        ("Change feed, BIN table, certificates", [
            ("Feed watchers", [(f"sum(crs_feed_watchers{{{J}}})", "watch streams"),
                               (f"sum(crs_feed_watchers_catching_up{{{J}}})", "catching up from PostgreSQL"),
                               (f"sum(crs_feed_watchers_waiting_turn{{{J}}})", "waiting for a catch-up turn"),
                               (f"sum(rate(crs_feed_catch_up_turns_taken_back_total{{{J}}}[5m]))",
                                "catch-up turns taken back /s (a consumer slow or stopped)"),
                               (f"crs_feed_watchers{{{J}}}", "{{instance}}")], "short", ""),
            ("Feed head per node and lag behind the furthest node",
             [(f"crs_feed_head_sequence{{{J}}}", "{{instance}} head"),
              (f"crs:feed_head_lag:sequences{{{J}}}", "{{instance}} lag")], "short", ""),
            ("BIN table version per node", [(f"crs_bin_table_version{{{J}}}", "{{instance}}"),
                                            (f"crs_bin_table_ranges{{{J}}}", "{{instance}} ranges")], "none", ""),
            ("Days until the served TLS certificate expires",
             [(f"(crs_tls_certificate_expiry_timestamp_seconds{{{J}}} - time()) / 86400", "{{instance}}")],
             "none", ""),
        ]),
    ]
    panels: list[dict[str, Any]] = []
    y = 0
    pid = 1
    for title, specs in rows:
        row = _row(title, y)
        row["id"] = pid
        pid += 1
        panels.append(row)
        y += 1
        for i, (ptitle, targets, unit, desc) in enumerate(specs):
            p = _panel(ptitle, targets, unit=unit, x=12 * (i % 2), y=y + 8 * (i // 2), description=desc)
            p["id"] = pid
            pid += 1
            panels.append(p)
        y += 8 * ((len(specs) + 1) // 2)
    return {
        "uid": "crs-lookup", "title": "CRS Lookup", "tags": ["crs-lookup"], "timezone": "utc",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "description": "What an SRE looks at: docs/slo.md. Generated by scripts/monitoring_manifests.py.",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "job", "type": "query", "datasource": _DS, "label": "job", "includeAll": True, "multi": True,
             "current": {"text": "All", "value": "$__all"},
             "query": {"query": "label_values(crs_topology_version, job)", "refId": "job"},
             "definition": "label_values(crs_topology_version, job)", "refresh": 2},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


# --- output -----------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:   # no &id001 anchors: every rule spelt out
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


HEADER = "# GENERATED by scripts/monitoring_manifests.py from one source: edit there, then regenerate.\n"


def outputs() -> dict[Path, str]:
    groups = rule_groups()
    rule = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "crs-lookup", "labels": {"app.kubernetes.io/name": "crs-lookup",
                                                      "app.kubernetes.io/part-of": "crs-lookup"}},
        "spec": groups,
    }
    board = json.dumps(dashboard(), indent=2) + "\n"
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "crs-dashboard",
                     # The label Grafana's dashboard sidecar looks for (kube-prometheus-stack's default).
                     "labels": {"grafana_dashboard": "1", "app.kubernetes.io/part-of": "crs-lookup"}},
        "data": {"crs-lookup.json": board},
    }
    return {
        RULES_FILE: HEADER + "# Prometheus rule file: objectives and alerts in docs/slo.md.\n" + _yaml(groups),
        PROMETHEUS_RULE: HEADER + "# The groups of monitoring/crs-rules.yaml for the Prometheus Operator.\n"
                         + _yaml(rule),
        DASHBOARD: board,
        DASHBOARD_CONFIGMAP: HEADER + "# k8s/monitoring/crs-dashboard.json for Grafana's dashboard sidecar.\n"
                             + _yaml(configmap),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report files that differ")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(("differs: " if args.check else "wrote: ") + str(path))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
