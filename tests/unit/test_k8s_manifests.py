"""k8s/ manifests and kustomize overlays, checked without a cluster.

Each overlay (and the base) is rendered by a small in-test subset of kustomize (resources,
configMapGenerator, replicas, strategic-merge patches: all that k8s/ uses) and, when `kubectl` or
`kustomize` is on PATH, by the real thing too; every check runs on each rendering. The node's
effective environment (ConfigMap + container env + mounted secret files) is fed to the real
`load_settings`, so a misspelt name, a bad value or a wrong secret path fails here, not in a pod.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from server import rpc
from server.cli.shards_commands import CLI_POOL_MAX
from server.crypto import encode_key, new_key
from server.settings import Settings, check_serving, load_settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
TARGETS = ("base", "overlays/dev", "overlays/production")
SETTING_NAMES = {"CRS_" + f.name.upper() for f in fields(Settings)}
POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Stand-ins for the mounted secret files (fresh random keys, never stored).
FAKE_SECRETS: dict[str, Callable[[], str]] = {
    "CRS_KEK": lambda: encode_key(new_key()),
    "CRS_FINGERPRINT_KEYS": lambda: f"1:{encode_key(new_key())}",
    "CRS_PG_DSN": lambda: "postgresql://crs:test@crs-pg-rw:5432/crs",
    "CRS_PG_READ_DSN": lambda: "postgresql://crs:test@crs-pg-ro:5432/crs",
}

Doc = dict[str, Any]


# --- rendering --------------------------------------------------------------------------------

def _load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _env_file(path: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key == key.strip(), f"{path}: bad line {line!r}"
            data[key] = value
    return data


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as k8s/ uses it: maps merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    named = (isinstance(base, list) and isinstance(patch, list)
             and all(isinstance(i, dict) and "name" in i for i in base + patch))
    if named:
        out_list = [copy.deepcopy(i) for i in base]
        for item in patch:
            at = next((n for n, cur in enumerate(out_list) if cur["name"] == item["name"]), None)
            if at is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[at] = _merge(out_list[at], item)
        return out_list
    if isinstance(base, list) and isinstance(patch, list) and patch and all(
            isinstance(i, dict) and "topologyKey" in i for i in patch):
        keep = [i for i in base if all(i.get("topologyKey") != p["topologyKey"] for p in patch)]
        return keep + copy.deepcopy(patch)
    return copy.deepcopy(patch)


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def render_builtin(directory: Path) -> list[Doc]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs += render_builtin(path) if path.is_dir() else _load_docs(path)
    for gen in kust.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env in gen.get("envs", []):
            data.update(_env_file(directory / env))
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        if gen.get("behavior") == "merge":
            _find(docs, "ConfigMap", gen["name"])["data"].update(data)
        else:
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for rep in kust.get("replicas", []):
        [target] = [d for d in docs if d["kind"] in POD_KINDS and d["metadata"]["name"] == rep["name"]]
        target["spec"]["replicas"] = rep["count"]
    for patch_ref in kust.get("patches", []):
        for patch in _load_docs(directory / patch_ref["path"]):
            target = _find(docs, patch["kind"], patch["metadata"]["name"])
            docs[docs.index(target)] = _merge(target, patch)
    return docs


def _kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


_RENDERED: dict[tuple[str, str], list[Doc]] = {}


@pytest.fixture(params=[(t, r) for t in TARGETS for r in ("builtin", "kustomize")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    target, renderer = request.param
    if (target, renderer) not in _RENDERED:
        if renderer == "builtin":
            _RENDERED[target, renderer] = render_builtin(K8S / target)
        else:
            command = _kustomize_command()
            if command is None:
                pytest.skip("neither kubectl nor kustomize on PATH")
            out = subprocess.run([*command, str(K8S / target)], capture_output=True, text=True, check=True)
            _RENDERED[target, renderer] = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    return copy.deepcopy(_RENDERED[target, renderer])


# --- helpers over rendered objects ------------------------------------------------------------

def _pod_specs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in POD_KINDS]


def _containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _node(docs: list[Doc]) -> tuple[Doc, Doc, Doc]:
    deployment = _find(docs, "Deployment", "crs-node")
    pod = deployment["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "crs-node"]
    return deployment, pod, container


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _effective_env(docs: list[Doc], pod: Doc, container: Doc, tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The container's environment as the kubelet builds it; secret files replaced by fake ones.

    Returns (environment, {CRS_X_FILE: secret key it is backed by})."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "requests.cpu" and ref.get("containerName", container["name"]) == container["name"]
        cpu = _cpu(container["resources"]["requests"]["cpu"]) / _cpu(ref.get("divisor", "1"))
        env[var["name"]] = str(math.ceil(cpu))   # the downward API rounds up
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    backing: dict[str, str] = {}
    for name in [n for n in env if n.endswith("_FILE") and n not in SETTING_NAMES]:   # CRS_TLS_CERT_FILE is one
        path = env[name]
        [mount] = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
        secret = volumes[mount["name"]]["secret"]
        relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
        [item] = [i for i in secret["items"] if i["path"] == relative]
        backing[name] = item["key"]
        fake = tmp_path / f"{secret['secretName']}.{item['key']}"
        fake.write_text(FAKE_SECRETS[item["key"]]() + "\n")
        env[name] = str(fake)
    return env, backing


# --- the checks -------------------------------------------------------------------------------

def test_every_yaml_file_parses() -> None:
    files = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        docs = _load_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("kind"), f"{path}: a document without kind"
            assert doc.get("apiVersion") or path.name == "kustomization.yaml", f"{path}: no apiVersion"
    for path in K8S.rglob("*.env"):
        assert _env_file(path), f"{path} sets nothing"


def test_crs_names_in_k8s_are_real_settings(tmp_path: Path) -> None:
    """Every CRS_* name anywhere under k8s/ (manifests, env files, comments) is a setting or its _FILE form."""
    used: set[str] = set()
    for path in [p for p in K8S.rglob("*") if p.is_file()]:
        used |= set(re.findall(r"\bCRS_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert "CRS_REDIS_SHARDS" in used and "CRS_KEK_FILE" in used
    unknown = {n for n in used if n not in SETTING_NAMES and not n.endswith("_FILE")}
    assert not unknown, f"not settings in server/settings.py: {sorted(unknown)}"
    for name in sorted(n for n in used if n.endswith("_FILE") and n not in SETTING_NAMES):
        base = name.removesuffix("_FILE")
        assert base in SETTING_NAMES, f"{name}: {base} is not a setting"
        value = FAKE_SECRETS.get(base, lambda: "x")()
        (tmp_path / base).write_text(value + "\n")
        loaded = load_settings({name: str(tmp_path / base)})
        assert getattr(loaded, base.removeprefix("CRS_").lower()) == value, f"load_settings ignores {name}"


def test_node_environment_loads_with_the_real_settings(rendered: list[Doc], tmp_path: Path) -> None:
    docs = rendered
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("crs-config"))
    assert set(config["data"]) <= SETTING_NAMES, f"not settings: {set(config['data']) - SETTING_NAMES}"
    assert not {"CRS_KEK", "CRS_FINGERPRINT_KEYS", "CRS_PG_DSN"} & set(config["data"]), "secrets in the ConfigMap"
    _, pod, container = _node(docs)
    env, backing = _effective_env(docs, pod, container, tmp_path)
    assert {n for n in env if n.startswith("CRS_")} <= SETTING_NAMES | {f"{n}_FILE" for n in SETTING_NAMES}
    # Each *_FILE variable reads the secret key of its own name, and secrets are never plain env values.
    assert backing == {"CRS_KEK_FILE": "CRS_KEK", "CRS_FINGERPRINT_KEYS_FILE": "CRS_FINGERPRINT_KEYS",
                       "CRS_PG_DSN_FILE": "CRS_PG_DSN", "CRS_PG_READ_DSN_FILE": "CRS_PG_READ_DSN"}
    assert not {"CRS_KEK", "CRS_FINGERPRINT_KEYS", "CRS_PG_DSN"} & set(env)
    settings = load_settings(env)
    check_serving(settings)    # what `crs serve` checks before it starts: a node that would refuse to start fails here
    assert settings.tls_cert_file and settings.tls_client_ca_file, "the gRPC port must be mutual TLS"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, settings.clients_file):
        [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        source = volumes[mount["name"]].get("secret") or volumes[mount["name"]]["configMap"]
        assert path.rsplit("/", 1)[1] in {i["path"] for i in source["items"]}, f"{path} is not mounted"
    assert settings.pg_dsn.startswith("postgresql://")
    assert settings.grpc_host == "0.0.0.0", "a pod must bind every interface"
    # One node process per requested core.
    assert settings.workers == math.ceil(_cpu(container["resources"]["requests"]["cpu"])) >= 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "health": settings.health_port, "metrics": settings.metrics_port}
    annotations = _find(docs, "Deployment", "crs-node")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    # Drain: the preStop sleep, then CRS_DRAIN_DELAY (NOT_SERVING, still answering), then CRS_GRACE_SECONDS
    # for the calls in flight, then the 5 s `crs serve` waits for its workers.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    needed = float(sleep[1]) + settings.drain_delay + settings.grace_seconds + 5
    assert pod["terminationGracePeriodSeconds"] >= needed, f"the kubelet SIGKILLs before the drain ends ({needed} s)"


def test_the_prometheus_operator_scrapes_every_node(rendered: list[Doc], tmp_path: Path) -> None:
    """k8s/monitoring is what a Prometheus Operator installation applies, and the operator ignores the
    pods' prometheus.io/* annotations: unless a ServiceMonitor or PodMonitor there reaches the node's
    metrics port, no node is scraped and no rule in the PrometheusRule beside it can ever fire."""
    _, pod, container = _node(rendered)
    settings = load_settings(_effective_env(rendered, pod, container, tmp_path)[0])
    labels = _find(rendered, "Deployment", "crs-node")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def container_port(port: str | int) -> int | None:
        return port if isinstance(port, int) else container_ports.get(port)

    scraped: set[tuple[int | None, str]] = set()
    for monitor in render_builtin(K8S / "monitoring"):
        kind = monitor["kind"]
        if kind not in ("ServiceMonitor", "PodMonitor"):
            continue
        spec = monitor["spec"]
        assert set(spec["selector"]) == {"matchLabels"}, f"{kind}/{monitor['metadata']['name']}: matchLabels only"
        wanted = spec["selector"]["matchLabels"].items()
        if kind == "PodMonitor":
            if wanted <= labels.items():
                scraped |= {(container_port(e["port"]), e.get("path", "/metrics")) for e in spec["podMetricsEndpoints"]}
            continue
        for service in [d for d in rendered if d["kind"] == "Service"]:
            if not wanted <= service["metadata"].get("labels", {}).items():
                continue
            if not service["spec"].get("selector") or not service["spec"]["selector"].items() <= labels.items():
                continue
            ports = {p["name"]: p for p in service["spec"]["ports"]}
            scraped |= {(container_port(ports[e["port"]]["targetPort"]), e.get("path", "/metrics"))
                        for e in spec["endpoints"] if e.get("port") in ports}
    assert (settings.metrics_port, "/metrics") in scraped, f"nothing in k8s/monitoring scrapes :{settings.metrics_port}"


def _max_surge(deployment: Doc, replicas: int) -> int:
    """Pods a rollout may run over `replicas` (Kubernetes rounds a percentage up; default 25%)."""
    surge = deployment["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    return math.ceil(replicas * int(surge[:-1]) / 100) if isinstance(surge, str) else int(surge)


def test_postgres_connections_fit_even_mid_rollout(tmp_path: Path) -> None:
    """The reference PostgreSQL (k8s/postgres) holds the production overlay's worst case: every process
    of the HPA's largest count of pods, plus the pods a rollout surges at that size, each with a full
    pool and its LISTEN connection, plus the migration Job, one `crs shards` run and the
    superuser-reserved slots. Past max_connections, new connections fail and so do misses and writes."""
    docs = render_builtin(K8S / "overlays" / "production")
    deployment, pod, container = _node(docs)
    settings = load_settings(_effective_env(docs, pod, container, tmp_path)[0])
    most = _find(docs, "HorizontalPodAutoscaler", "crs-node")["spec"]["maxReplicas"]
    pods = most + _max_surge(deployment, most)
    per_process = settings.pg_pool_max + (1 if settings.feed_listen else 0)
    [cluster] = _load_docs(K8S / "postgres" / "cloudnativepg-cluster.yaml")
    parameters = cluster["spec"]["postgresql"]["parameters"]
    others = 1 + CLI_POOL_MAX + int(parameters.get("superuser_reserved_connections", 3))
    needed = pods * settings.workers * per_process + others
    assert needed <= int(parameters["max_connections"]), (
        f"{pods} pods ({most} + rollout surge) x {settings.workers} workers x {per_process} + {others}"
        f" = {needed} connections > max_connections {parameters['max_connections']}")
    assert _max_surge({"spec": {}}, 24) == 6
    assert _max_surge({"spec": {"strategy": {"rollingUpdate": {"maxSurge": 2}}}}, 24) == 2


def test_the_migration_logs_in_as_the_owner_and_the_nodes_do_not(rendered: list[Doc]) -> None:
    """The nodes' login is a member of crs_app, never the schema owner (docs/security.md): the DSN they
    mount (Secret crs-pg) is not the one the crs-migrate Job mounts (crs-pg-owner), and the reference
    cluster creates that login in crs_app."""
    def dsn_secret(pod: Doc, container: Doc) -> str:
        [var] = [v for v in container["env"] if v["name"] == "CRS_PG_DSN_FILE"]
        [mount] = [m for m in container["volumeMounts"] if var["value"].startswith(m["mountPath"].rstrip("/") + "/")]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        return str(volume["secret"]["secretName"])

    _, pod, container = _node(rendered)
    job = _find(rendered, "Job", "crs-migrate")["spec"]["template"]["spec"]
    assert dsn_secret(pod, container) == "crs-pg"
    assert dsn_secret(job, job["containers"][0]) == "crs-pg-owner"
    examples = {d["metadata"]["name"]: d for d in _load_docs(K8S / "base" / "secret.example.yaml")}
    assert examples["crs-pg"]["stringData"]["CRS_PG_DSN"].startswith("postgresql://crs_node:")
    assert examples["crs-pg-owner"]["stringData"]["CRS_PG_DSN"].startswith("postgresql://crs:")
    [cluster] = _load_docs(K8S / "postgres" / "cloudnativepg-cluster.yaml")
    roles = {r["name"]: r for r in cluster["spec"]["managed"]["roles"]}
    assert roles["crs_node"]["login"] and roles["crs_node"]["inRoles"] == ["crs_app"]
    assert cluster["spec"]["bootstrap"]["initdb"]["owner"] not in roles


def test_node_probes_use_grpc_health_on_the_plaintext_health_port(rendered: list[Doc], tmp_path: Path) -> None:
    """Kubernetes' gRPC probes cannot do TLS: on the mutual-TLS gRPC port they would fail every
    handshake, and no pod would ever be ready. They ask CRS_HEALTH_PORT."""
    _, pod, container = _node(rendered)
    settings = load_settings(_effective_env(rendered, pod, container, tmp_path)[0])
    assert settings.health_port and settings.health_port != settings.grpc_port
    services = {""} | {svc.full_name for svc in rpc.SERVICES}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe} is not a gRPC probe"
        assert spec["grpc"]["port"] == settings.health_port, f"{probe} probes port {spec['grpc']['port']}"
        assert spec["grpc"].get("service", "") in services


def test_node_services_headless_and_clusterip(rendered: list[Doc]) -> None:
    deployment, _, _ = _node(rendered)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    headless = _find(rendered, "Service", "crs-node-headless")
    regular = _find(rendered, "Service", "crs-node")
    assert headless["spec"]["clusterIP"] == "None"
    assert regular["spec"].get("clusterIP") != "None"
    for service in (headless, regular):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {"name": "grpc", "port": 50051} in [{"name": p["name"], "port": p["port"]}
                                                    for p in service["spec"]["ports"]]
    hpa = _find(rendered, "HorizontalPodAutoscaler", "crs-node")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "crs-node"
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _find(rendered, "PodDisruptionBudget", "crs-node")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_only_labelled_callers_and_prometheus_reach_the_nodes(rendered: list[Doc]) -> None:
    """The node pods' ports were open to every pod in the cluster (PCI DSS 1.3): the NetworkPolicy
    admits the gRPC port from pods labelled as callers and the metrics port from Prometheus, by the
    container's port names, and nothing from everywhere."""
    deployment, _, container = _node(rendered)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policy = _find(rendered, "NetworkPolicy", "crs-node")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    opened: dict[str, list[dict[str, str]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without 'from' admits every source"
        for peer in rule["from"]:
            assert peer["podSelector"]["matchLabels"], "an empty podSelector admits every pod"
        for port in rule["ports"]:
            assert port["port"] in ports, f"{port['port']} is no port of the node container"
            opened[port["port"]] = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert opened == {"grpc": [{"crs-lookup/client": "true"}], "metrics": [{"app.kubernetes.io/name": "prometheus"}]}


def test_shard_list_names_every_statefulset_pod(rendered: list[Doc], tmp_path: Path) -> None:
    _, pod, container = _node(rendered)
    shards = load_settings(_effective_env(rendered, pod, container, tmp_path)[0]).redis_shards
    redis = _find(rendered, "StatefulSet", "crs-redis")
    replicas, service = redis["spec"]["replicas"], redis["spec"]["serviceName"]
    assert _find(rendered, "Service", service)["spec"]["clusterIP"] == "None"
    [redis_container] = redis["spec"]["template"]["spec"]["containers"]
    [port] = [p["containerPort"] for p in redis_container["ports"] if p["name"] == "redis"]
    expected = [(f"shard-{i}", f"redis://{redis['metadata']['name']}-{i}.{service}:{port}/0") for i in range(replicas)]
    assert [(s.name, s.url) for s in shards] == expected
    args = redis_container.get("command", []) + redis_container.get("args", [])
    for flag, value in (("--save", ""), ("--appendonly", "no"), ("--maxmemory-policy", "allkeys-lru")):
        assert args[args.index(flag) + 1] == value, f"redis {flag} is not {value!r}"
    assert "--maxmemory" in args


def test_every_container_runs_as_non_root(rendered: list[Doc]) -> None:
    pods = _pod_specs(rendered)
    assert {name for name, _ in pods} >= {"Deployment/crs-node", "StatefulSet/crs-redis", "Job/crs-migrate"}
    for name, pod in pods:
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsUser", 1) != 0, name
        for container in _containers(pod):
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            where = f"{name} container {container['name']}"
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert ctx.get("runAsUser", 1) != 0, f"{where}: runs as uid 0"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"
            uses_crs = any(e["name"].startswith("CRS_") for e in container.get("env", [])) or container.get("envFrom")
            if uses_crs:   # Service links would add CRS_NODE_* / CRS_REDIS_* variables
                assert pod.get("enableServiceLinks") is False, f"{name}: enableServiceLinks"
    # The node writes only to /tmp (Prometheus multiprocess files).
    _, pod, container = _node(rendered)
    [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[tmp["name"]]


_B64_32 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{43}=?(?![A-Za-z0-9+/_=-])")


def _key_like(text: str) -> list[str]:
    """Substrings that look like a base64 32-byte key (mixed case and digits, as random keys are)."""
    hits = []
    for token in _B64_32.findall(text):
        if any(c.isupper() for c in token) and any(c.islower() for c in token) and any(c.isdigit() for c in token):
            raw = token.rstrip("=").replace("+", "-").replace("/", "_")
            try:
                if len(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))) == 32:
                    hits.append(token[:6] + "...")
            except (binascii.Error, ValueError):
                continue
    return hits


def test_key_detector_catches_real_keys() -> None:
    key = new_key()
    assert _key_like(f"CRS_KEK: {encode_key(key)}")
    assert _key_like(f'x: "{base64.b64encode(key).decode()}"')
    assert not _key_like("preferredDuringSchedulingIgnoredDuringExecution REPLACE-ME")


def test_no_key_material_anywhere() -> None:
    files = [p for p in K8S.rglob("*") if p.is_file()]
    files += [p for p in (ROOT / "docs" / "deploy.md", ROOT / "Dockerfile") if p.exists()]
    for path in files:
        assert not _key_like(path.read_text()), f"{path} holds something that looks like key material"
    for path in K8S.rglob("*.yaml"):
        for doc in _load_docs(path):
            if doc.get("kind") != "Secret":
                continue
            values = list((doc.get("stringData") or {}).values())
            values += [base64.b64decode(v).decode(errors="replace") for v in (doc.get("data") or {}).values()]
            for value in values:
                assert not _key_like(value), f"{path}: Secret {doc['metadata']['name']} holds key material"
                assert "REPLACE-ME" in value, f"{path}: Secret {doc['metadata']['name']} must hold placeholders only"


def test_no_secret_is_deployed(rendered: list[Doc]) -> None:
    assert not [d for d in rendered if d["kind"] == "Secret"], "Secrets are created out of band, never by kustomize"
