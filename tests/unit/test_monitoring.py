"""The monitoring files, checked without Prometheus, Grafana or a cluster (docs/slo.md).

- Every metric name a rule or dashboard expression uses is one a node exports (server/metrics.py) or
  one a recording rule defines; expressions are parsed with promql-parser, a real PromQL parser.
- monitoring/crs-rules.yaml is a well-formed rule file; each alert has its runbook in docs/runbooks/;
  the PrometheusRule manifest holds exactly the same groups; all generated files are current.
- `promtool test rules` on tests/monitoring/*.yaml when promtool is on PATH.
- Every Kubernetes object under k8s/ (the kustomize renderings of base, overlays and monitoring, and
  stand-alone full-object files) validates against the Kubernetes OpenAPI schemas (kubernetes-validate).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from scripts import monitoring_manifests as mm
from server.metrics import _LATENCY_BUCKETS, LearnedGauge, Metrics

yaml = pytest.importorskip("yaml")
promql_parser = pytest.importorskip("promql_parser")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
RUNBOOKS = ROOT / "docs" / "runbooks"
RULES = ROOT / "monitoring" / "crs-rules.yaml"
PROMETHEUS_RULE = K8S / "monitoring" / "crs-prometheusrule.yaml"
DASHBOARD = K8S / "monitoring" / "crs-dashboard.json"
PROMTOOL_TESTS = sorted((ROOT / "tests" / "monitoring").glob("*.yaml"))
SEVERITIES = {"page", "ticket"}
# Kubernetes versions the manifests must validate against: the oldest we support (native gRPC
# probes and matchLabelKeys need 1.27+; 1.29 is the oldest upstream-supported line we test) and
# the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Custom resources: kubernetes-validate ships only the built-in API schemas. Skipped explicitly;
# the test fails if the list names a kind no manifest uses (or a new CRD kind appears).
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"),   # k8s/monitoring (Prometheus Operator)
    ("monitoring.coreos.com/v1", "ServiceMonitor"),   # k8s/monitoring (Prometheus Operator)
    ("postgresql.cnpg.io/v1", "Cluster"),             # k8s/postgres (CloudNativePG)
}
# Grafana's variables, replaced by something PromQL parses before the expression is checked.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


# --- what a node exports ----------------------------------------------------------------------

def exported_names() -> set[str]:
    """The sample names /metrics can show, from the metric objects themselves (prometheus_client
    appends _total to counters; histograms expose _bucket/_sum/_count; both may add _created), and
    the gauges a process exports once it has learned their value."""
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    names: set[str] = set()
    for family in registry.collect():
        names |= {family.name + s for s in suffixes[family.type]}
    return names | {g.name for g in vars(metrics).values() if isinstance(g, LearnedGauge)}


def test_exported_names_follow_prometheus_client_suffixes() -> None:
    names = exported_names()
    assert {"crs_lookups_total", "crs_rpc_latency_seconds_bucket", "crs_rpc_latency_seconds_count",
            "crs_cache_shard_up"} <= names
    assert "crs_lookups" not in names and "crs_rpc_latency_seconds" not in names


# --- PromQL metric-name extraction ------------------------------------------------------------

def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (vector/matrix selectors, {__name__="..."} matchers)."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    expr = re.sub(r"\$\{?(\w+)\}?", r"\1", expr)   # $job / ${job} inside label matchers
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                found.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    found.add(m.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (method, le) (rate(a_bucket{code="OK", le="0.025"}[5m] offset 1m))', {"a_bucket"}),
    ("histogram_quantile(0.99, sum without (pod) (rate(b_total[$__rate_interval])))", {"b_total"}),
    ("x / on (job) group_left (tier) y > bool 0 unless ignoring (shard) z", {"x", "y", "z"}),
    ('max_over_time(c{job=~"$job"}[1h:1m]) and changes(d[5m]) == 0', {"c", "d"}),
    ('{__name__="e", shard="by"} - time() + vector(1) + count(f) by (group_right)', {"e", "f"}),
    ("label_replace(up, \"on\", \"$1\", \"instance\", \"(.*)\")", {"up"}),
])
def test_metric_names_skips_labels_functions_keywords_and_durations(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_metric_names_rejects_what_is_not_promql() -> None:
    with pytest.raises(Exception):  # noqa: B017 (the parser raises a plain exception type)
        metric_names("sum(rate(x[5m])")


# --- the rule file ----------------------------------------------------------------------------

def _rule_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return doc


def _rules() -> Iterator[dict[str, Any]]:
    for group in _rule_doc()["groups"]:
        yield from group["rules"]


def _dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):   # label_values(METRIC, label): the metric is what counts
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query["query"])
            assert m, f"unexpected variable query {query['query']!r}"
            exprs.append(m.group(1))
    return exprs


def test_rule_file_structure() -> None:
    doc = _rule_doc()
    assert set(doc) == {"groups"}
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    alerts = 0
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        assert group["rules"], f"group {group['name']} is empty"
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            promql_parser.parse(rule["expr"])
            if "record" in rule:
                assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["record"])
                assert set(rule) <= {"record", "expr", "labels"}
                continue
            alerts += 1
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
            ann = rule["annotations"]
            assert ann["summary"] and ann["description"], rule["alert"]
            url = ann["runbook_url"]
            assert url.startswith(mm.RUNBOOK_BASE), url
            runbook = RUNBOOKS / url.removeprefix(mm.RUNBOOK_BASE)
            assert runbook.is_file(), f"{rule['alert']}: no runbook {runbook.relative_to(ROOT)}"
            assert f"`{rule['alert']}`" in runbook.read_text(), f"{runbook.name} does not name {rule['alert']}"
    assert alerts >= 10


def test_every_runbook_has_an_alert_or_is_a_procedure() -> None:
    linked = {r["annotations"]["runbook_url"].removeprefix(mm.RUNBOOK_BASE) for r in _rules() if "alert" in r}
    procedures = {"resharding.md"}
    assert {p.name for p in RUNBOOKS.glob("*.md")} == linked | procedures


def test_every_metric_used_is_exported_or_recorded() -> None:
    exported = exported_names()
    recorded = {r["record"] for r in _rules() if "record" in r}
    sources = [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in _rules()]
    sources += [("dashboard", e) for e in _dashboard_exprs()]
    assert len(sources) > 60
    used: set[str] = set()
    for where, expr in sources:
        names = metric_names(expr)
        assert names or expr.startswith("vector("), f"{where}: selects no metric: {expr}"
        unknown = names - exported - recorded
        assert not unknown, f"{where}: {sorted(unknown)} is neither exported by server/metrics.py nor recorded"
        used |= names
    assert recorded <= used, f"recorded but never used: {sorted(recorded - used)}"


def test_slo_rules_cover_every_method_of_each_service() -> None:
    """A new RPC must not silently fall outside its service's SLI."""
    from server import rpc
    services = {s.full_name.rsplit(".", 1)[1]: s for s in rpc.SERVICES}
    for name, (methods, objective) in mm.AVAILABILITY.items():
        expected = set(rpc.methods(services[name]))
        if name == "ChangeFeedService":
            expected -= {"Watch"}   # docs/slo.md: a Watch never ends OK by design
        assert set(methods.split("|")) == expected, name
        assert 0.99 <= objective < 1
    assert mm.AVAILABILITY["LookupService"][1] == 0.99999
    assert float(mm.LATENCY_BOUND) in _LATENCY_BUCKETS, "the latency SLI needs a bucket bound"


def test_bad_codes_are_the_services_fault_only() -> None:
    import grpc
    codes = {c.name for c in grpc.StatusCode}
    assert set(mm.BAD_CODES) <= codes
    assert not {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED"} & set(mm.BAD_CODES)
    assert {"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "UNKNOWN"} <= set(mm.BAD_CODES)


def test_prometheusrule_holds_the_rule_file_groups() -> None:
    [manifest] = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == _rule_doc()


def test_generated_files_are_current() -> None:
    stale = [str(p.relative_to(ROOT)) for p, text in mm.outputs().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"regenerate with `python -m scripts.monitoring_manifests`: {stale}"


def test_dashboard_configmap_carries_the_dashboard() -> None:
    [cm] = [d for d in yaml.safe_load_all(mm.DASHBOARD_CONFIGMAP.read_text()) if d]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["crs-lookup.json"]) == json.loads(DASHBOARD.read_text())


# --- promtool -------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not on PATH (Prometheus' release "
                    "archive or Debian's prometheus package has it); the rules are then only checked above")
def test_promtool_checks_and_unit_tests() -> None:
    assert PROMTOOL_TESTS, "no promtool test files in tests/monitoring/"
    subprocess.run(["promtool", "check", "rules", str(RULES)], check=True, capture_output=True, text=True)
    for path in PROMTOOL_TESTS:
        out = subprocess.run(["promtool", "test", "rules", path.name], cwd=path.parent,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_tests_cover_the_page_burn_alert_and_shard_down() -> None:
    tested = set()
    for path in PROMTOOL_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../../monitoring/crs-rules.yaml"]
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                tested |= {(case["alertname"], a["exp_labels"]["severity"]) for a in case["exp_alerts"]}
    assert {("CRSErrorBudgetBurn", "page"), ("CRSCacheShardDown", "ticket")} <= tested


# --- Kubernetes schemas -------------------------------------------------------------------------

def _kustomize(directory: Path) -> list[dict[str, Any]]:
    from tests.unit.test_k8s_manifests import _kustomize_command, render_builtin
    command = _kustomize_command()
    if command is None:
        return render_builtin(directory)
    out = subprocess.run([*command, str(directory)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _objects() -> list[tuple[str, dict[str, Any]]]:
    """Rendered kustomizations, plus full-object files no kustomization renders. Strategic-merge
    patch files are partial objects: they are validated inside their rendering, never alone."""
    objects: list[tuple[str, dict[str, Any]]] = []
    rendered_files: set[Path] = set()
    patches: set[Path] = set()
    for kust in sorted(K8S.rglob("kustomization.yaml")):
        directory = kust.parent
        spec = yaml.safe_load(kust.read_text())
        rendered_files |= {(directory / r).resolve() for r in spec.get("resources", [])}
        patches |= {(directory / p["path"]).resolve() for p in spec.get("patches", [])}
        objects += [(f"{directory.relative_to(K8S)} (rendered)", d) for d in _kustomize(directory)]
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in rendered_files | patches:
            continue
        objects += [(str(path.relative_to(K8S)), d) for d in yaml.safe_load_all(path.read_text()) if d]
    return objects


OBJECTS = _objects()


def test_every_manifest_is_covered() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in OBJECTS}
    assert CRD_KINDS <= kinds, f"CRD_KINDS names kinds no manifest uses: {CRD_KINDS - kinds}"
    where = {w.split(" ")[0] for w, _ in OBJECTS}
    assert {"base", "overlays/dev", "overlays/production", "monitoring",
            "base/secret.example.yaml", "postgres/cloudnativepg-cluster.yaml"} <= where
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job",
            "NetworkPolicy", "ConfigMap", "Secret"} <= {k for _, k in kinds}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "obj"), OBJECTS,
                         ids=[f"{w}:{d['kind']}/{d['metadata']['name']}" for w, d in OBJECTS])
def test_manifest_validates_against_the_kubernetes_schemas(where: str, obj: dict[str, Any], version: str) -> None:
    if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
        pytest.skip(f"{obj['kind']} is a custom resource: kubernetes-validate has no schema for it")
    kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_bad_manifest() -> None:
    [deployment] = [d for w, d in OBJECTS if w.startswith("overlays/production") and d["kind"] == "Deployment"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)
    crd = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(crd, K8S_VERSIONS[-1], strict=True)
