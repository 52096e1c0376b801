"""deploy/kubernetes/ and the Containerfile, checked offline: there is no cluster and no container engine here.

- Every manifest parses, names no namespace, and each built-in kind validates against the OpenAPI schemas of
  Kubernetes 1.33 that kubernetes-validate ships (strict: an unknown field is an error), with the network
  closed while it runs. The PodMonitor (monitoring.coreos.com/v1) is a CRD, for which no schema ships: its
  structure is checked by hand instead.
- The manifests against the daemon itself: the probe and scrape paths are routes of `create_app`, open (or
  not) over TCP as the kubelet and Prometheus call them; the ConfigMap's runnerd.toml loads with the pod's
  environment, listens on the port the DaemonSets, the Service, the NetworkPolicy and the PodMonitor name,
  finds its token where the Secret is mounted, and writes only where a writable volume is; the preStop
  command parses with runnerd's CLI parser, talks to the socket the daemon binds, and fits the grace period.
- The Containerfile, statically: its stages, the llama-server build against backends/llamacpp/install.py
  (source version, cmake options, the whole bin/ directory), the non-root user, the entrypoint, and the
  binary the image names in RUNNERD_LLAMA_SERVER.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx2 as httpx
import kubernetes_validate
import pytest
import yaml

from backends.llamacpp import install
from runnerd import __version__
from runnerd.api.auth import HTTP_TOKEN
from runnerd.cli.parser import build_parser
from runnerd.config import default_socket, load_settings, parse_listen
from runnerd.server import create_app
from tests.conftest import ROOT, app_on_loopback

DEPLOY = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "Containerfile"
README = ROOT / "README.md"
# The Kubernetes release whose schemas the manifests must satisfy (kubernetes-validate ships 1.11 to 1.37).
KUBERNETES_VERSION = "1.33"
CRD_GROUPS = ("monitoring.coreos.com/",)
SECRET = "runnerd-token"
GiB = 1 << 30

MANIFEST_FILES = sorted(DEPLOY.rglob("*.yaml"))


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFEST_FILES for doc in load(path)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {DEPLOY}, found {len(found)}"
    return found[0]


def daemonsets() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "DaemonSet"}


DAEMONSETS = ["runnerd", "runnerd-gpu"]


def pod_spec(ds: dict[str, Any]) -> dict[str, Any]:
    return ds["spec"]["template"]["spec"]


def container(ds: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(ds)["containers"] if c["name"] == "runnerd"]
    return found


def container_env(ds: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in container(ds).get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are checked here"
        env[item["name"]] = item["value"]
    return env


def named_port(ds: dict[str, Any], port: int | str) -> int:
    """A port as a container's probe or a Service's targetPort names it, resolved to a number."""
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container(ds)["ports"] if p["name"] == port]
    return int(found)


def quantity(text: str | int) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text))
    assert match and match.group(2) in {"", *units}, text
    return int(match.group(1)) * units.get(match.group(2), 1)


def listen_port() -> int:
    return parse_listen(configmap_toml()["http"]["listen"])[1]


def configmap_text() -> str:
    return str(one("ConfigMap", "runnerd-config")["data"]["runnerd.toml"])


def configmap_toml() -> dict[str, Any]:
    return tomllib.loads(configmap_text())


# --- the pod's filesystem, as its volumes make it -----------------------------------------------------

@dataclass
class Mount:
    path: PurePosixPath
    volume: dict[str, Any]
    read_only: bool

    @property
    def writable(self) -> bool:
        return not self.read_only and not {"configMap", "secret", "projected", "downwardAPI"} & set(self.volume)


def mounts(ds: dict[str, Any]) -> list[Mount]:
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    return [Mount(PurePosixPath(m["mountPath"]), volumes[m["name"]], bool(m.get("readOnly")))
            for m in container(ds)["volumeMounts"]]


def mount_of(ds: dict[str, Any], path: Path | str) -> Mount | None:
    """The volume a path of the pod lies on (the deepest mount above it), None for the image's root."""
    p = PurePosixPath(path)
    above = [m for m in mounts(ds) if p == m.path or m.path in p.parents]
    return max(above, key=lambda m: len(m.path.parts), default=None)


def projected_file(ds: dict[str, Any], path: Path | str, source: str) -> dict[str, Any]:
    """The configMap/secret source and item a file of a projected volume comes from."""
    m = mount_of(ds, path)
    assert m is not None and "projected" in m.volume, f"{path} is not on a projected volume"
    relative = str(PurePosixPath(path).relative_to(m.path))
    for src in m.volume["projected"]["sources"]:
        for item in src.get(source, {}).get("items", []):
            if item["path"] == relative:
                return {"name": src[source]["name"], "key": item["key"], "read_only": m.read_only}
    raise AssertionError(f"{path} is not a {source} item of the volume {m.volume['name']}")


# --- the Containerfile --------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]

    def args(self) -> dict[str, str]:
        out = {}
        for rest in self.all("ARG"):
            name, _, default = rest.partition("=")
            out[name.strip()] = default.strip()
        return out

    def env(self) -> dict[str, str]:
        out = {}
        for rest in self.all("ENV"):
            for word in shlex.split(rest):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {rest}: use KEY=VALUE"
                out[key] = value
        return out


def containerfile() -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM, the stages). Continuation lines are joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        if raw.strip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            logical.append(line)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((instruction, rest))
        else:
            assert instruction == "ARG", f"only ARG may come before the first FROM, not {instruction}"
            key, _, default = rest.partition("=")
            global_args[key] = default
    return global_args, stages


def stage(name: str) -> Stage:
    (found,) = [s for s in containerfile()[1] if s.name == name]
    return found


def final_stage() -> Stage:
    return containerfile()[1][-1]


def entrypoint() -> list[str]:
    (text,) = final_stage().all("ENTRYPOINT")
    value = json.loads(text)
    assert isinstance(value, list), "ENTRYPOINT in exec (JSON) form, so that runnerd is PID 1 and gets SIGTERM"
    return value


def image_env() -> dict[str, str]:
    env = final_stage().env()
    env["PATH"] = env["PATH"].replace("${PATH}", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env


# --- settings as the daemon loads them inside the pod -------------------------------------------------

def pod_environment(ds: dict[str, Any]) -> dict[str, str]:
    """What runnerd's process sees: the image's ENV, then the container's env."""
    return {**image_env(), **container_env(ds)}


@pytest.fixture
def in_pod(monkeypatch, tmp_path):
    """Load settings as the daemon does in a given DaemonSet's pod: this host's runnerd and directory
    variables removed, the pod's set, and RUNNERD_CONFIG's file (the ConfigMap's runnerd.toml) copied here."""

    def enter(ds: dict[str, Any]):
        for name in list(os.environ):
            if name.startswith(("RUNNERD_", "XDG_")) or name.endswith("_DIRECTORY"):
                monkeypatch.delenv(name)
        env = pod_environment(ds)
        for name, value in env.items():
            if name != "PATH":
                monkeypatch.setenv(name, value)
        config = tmp_path / "runnerd.toml"
        config.write_text(configmap_text())
        monkeypatch.setenv("RUNNERD_CONFIG", str(config))
        return load_settings(), env

    return enter


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while validating offline: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def daemon_routes(tmp_path: Path) -> set[tuple[str, str]]:
    settings = load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    app = create_app(settings, backends={})
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}


# === the manifests as Kubernetes sees them ============================================================

def test_the_expected_resources_are_there():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in manifests())
    assert kinds == [("ConfigMap", "runnerd-config"), ("DaemonSet", "runnerd"), ("DaemonSet", "runnerd-gpu"),
                     ("NetworkPolicy", "runnerd"), ("PodMonitor", "runnerd"), ("Service", "runnerd")]
    # Optional parts live in subdirectories, so that `kubectl apply -f deploy/kubernetes/` takes the core only.
    assert {p.relative_to(DEPLOY).as_posix() for p in MANIFEST_FILES} == {
        "configmap.yaml", "daemonset.yaml", "service.yaml", "networkpolicy.yaml",
        "gpu/daemonset-gpu.yaml", "prometheus/podmonitor.yaml"}


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_manifests_are_namespace_agnostic(path):
    for doc in load(path):
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert "namespace" not in doc["metadata"], f"{path}: `kubectl -n` chooses the namespace"
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "runnerd"


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_builtin_kinds_validate_against_the_kubernetes_schemas(path, no_network):
    for doc in load(path):
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # no schema ships for a CRD: test_podmonitor_structure
        used = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert used == KUBERNETES_VERSION, f"validated against {used}, not {KUBERNETES_VERSION}"


def test_the_validation_is_strict(no_network):
    """A misspelt field fails: the check above is not a no-op."""
    ds = copy.deepcopy(daemonsets()["runnerd"])
    container(ds)["readinessProbe"]["httpGet"]["pth"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBERNETES_VERSION, strict=True)
    assert kubernetes_validate.__version__ == "1.37.0"


def test_only_the_podmonitor_is_a_crd():
    crds = [(d["apiVersion"], d["kind"]) for d in manifests() if d["apiVersion"].startswith(CRD_GROUPS)]
    assert crds == [("monitoring.coreos.com/v1", "PodMonitor")]


def test_podmonitor_structure(tmp_path):
    """By hand, as the Prometheus Operator's CRD would: known fields only, the selector picks both
    DaemonSets' pods, the port and path are runnerd's metrics endpoint, the token comes from the Secret."""
    pm = one("PodMonitor", "runnerd")
    assert set(pm) == {"apiVersion", "kind", "metadata", "spec"}
    spec = pm["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                         "sampleLimit", "targetLimit", "labelLimit", "attachMetadata"}
    selector = spec["selector"]
    assert set(selector) == {"matchLabels"}
    for ds in daemonsets().values():
        assert selector["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    endpoints = spec["podMetricsEndpoints"]
    assert isinstance(endpoints, list) and len(endpoints) == 1
    (ep,) = endpoints
    assert set(ep) <= {"port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "authorization",
                       "relabelings", "metricRelabelings", "honorLabels", "honorTimestamps", "params", "tlsConfig",
                       "followRedirects", "enableHttp2", "filterRunning", "proxyUrl"}
    for ds in daemonsets().values():
        assert named_port(ds, ep["port"]) == listen_port()
    assert ep["path"] == "/metrics" and ("GET", "/metrics") in daemon_routes(tmp_path)
    assert ep["scheme"] == "http"
    seconds = {}
    for key in ("interval", "scrapeTimeout"):
        match = re.fullmatch(r"(\d+)(s|m)", ep[key])
        assert match, f"{key}: {ep[key]!r} is not a Prometheus duration here"
        seconds[key] = int(match.group(1)) * (60 if match.group(2) == "m" else 1)
    assert seconds["scrapeTimeout"] < seconds["interval"]
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": SECRET, "key": "token"}}
    for relabel in ep.get("relabelings", []):
        assert set(relabel) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator",
                                "modulus"}
        assert all(label.startswith("__meta_kubernetes_") for label in relabel.get("sourceLabels", []))


# === the manifests against the daemon ==================================================================

def test_the_daemon_serves_the_probe_paths(tmp_path):
    routes = daemon_routes(tmp_path)
    for ds in daemonsets().values():
        c = container(ds)
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["startupProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            path = c[probe]["httpGet"]["path"]
            assert ("GET", path) in routes, (
                f"GET {path} is not a route of runnerd.server.create_app: the {probe} of {ds['metadata']['name']} "
                "would never pass" + (" (GET /ready lands with the drain work)" if path == "/ready" else ""))
            # The kubelet sends no token: the probe must not need one (next test).
            assert "httpHeaders" not in c[probe]["httpGet"]


@pytest.mark.anyio
async def test_probes_need_no_token_and_metrics_needs_it(tmp_path):
    """Over TCP, as the kubelet and Prometheus call them: /health and /ready answer without a token
    (/ready 503 is a valid answer: this daemon has no engine), /metrics only with it."""
    settings = load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    app = create_app(settings, backends={})
    app[HTTP_TOKEN] = "s3cret"
    async with app_on_loopback(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        health, ready, metrics_without, metrics_with = [
            await c.get("/health"), await c.get("/ready"), await c.get("/metrics"),
            await c.get("/metrics", headers={"Authorization": "Bearer s3cret"})]
    assert health.status_code == 200
    assert ready.status_code in (200, 503), f"GET /ready over TCP without a token: {ready.status_code} {ready.text}"
    assert "ready" in ready.json()
    assert metrics_without.status_code == 401
    assert metrics_with.status_code == 200 and "runnerd_" in metrics_with.text


def test_every_port_is_the_listen_port():
    port = listen_port()
    host = parse_listen(configmap_toml()["http"]["listen"])[0]
    assert host in ("0.0.0.0", "::"), "the kubelet, the Service and Prometheus reach the pod's address, not loopback"
    for ds in daemonsets().values():
        c = container(ds)
        ports = [(p["name"], p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]]
        assert ports == [("http", port, "TCP")]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert named_port(ds, c[probe]["httpGet"]["port"]) == port
    service = one("Service", "runnerd")
    (sp,) = service["spec"]["ports"]
    assert sp["port"] == port
    for ds in daemonsets().values():
        assert named_port(ds, sp["targetPort"]) == port
    (rule,) = one("NetworkPolicy", "runnerd")["spec"]["ingress"]
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", port)]
    assert f"EXPOSE {port}" in CONTAINERFILE.read_text()


@pytest.mark.parametrize("name", DAEMONSETS)
def test_settings_load_as_in_the_pod(name, in_pod):
    ds = daemonsets()[name]
    settings, env = in_pod(ds)
    # RUNNERD_CONFIG is the ConfigMap's runnerd.toml, read-only.
    assert projected_file(ds, env["RUNNERD_CONFIG"], "configMap") == {
        "name": "runnerd-config", "key": "runnerd.toml", "read_only": True}
    # The token file is the Secret's key "token", read-only.
    assert settings.http.listen is not None and settings.http.token_file is not None
    assert projected_file(ds, settings.http.token_file, "secret") == {"name": SECRET, "key": "token",
                                                                       "read_only": True}
    # Everything runnerd (and pip, for vLLM) writes lies on a writable volume: the root is read-only.
    assert container(ds)["securityContext"]["readOnlyRootFilesystem"] is True
    writes = {"runtime_dir": settings.runtime_dir, "data_dir": settings.data_dir, "cache_dir": settings.cache_dir,
              "runner logs": settings.runner_log_dir, "socket": settings.socket_path.parent, "TMPDIR": "/tmp",
              "HOME": env["HOME"], "PIP_CACHE_DIR": env["PIP_CACHE_DIR"]}
    for what, path in writes.items():
        m = mount_of(ds, path)
        assert m is not None and m.writable, f"{what} ({path}) is not on a writable volume of {name}"
    # The engine is the image's build; the GPU pods tell llama.cpp to offload (no nvcc in the image).
    llama = settings.engine("llama.cpp")
    assert str(llama.server) == image_env()["RUNNERD_LLAMA_SERVER"]
    gpu = "nvidia.com/gpu" in container(ds)["resources"]["limits"]
    assert llama.cuda == ("on" if gpu else "auto")


@pytest.mark.parametrize("name", DAEMONSETS)
def test_runners_are_capped_below_the_memory_limit(name, in_pod):
    """runnerd measures the node's memory, not the container's limit: without a cap below the limit it
    would admit engines the kernel then kills."""
    ds = daemonsets()[name]
    settings, _ = in_pod(ds)
    limit = quantity(container(ds)["resources"]["limits"]["memory"])
    assert settings.memory.ram_limit is not None, "set RUNNERD_MEMORY__RAM_LIMIT below the memory limit"
    assert limit - int(settings.memory.ram_limit) >= GiB, "leave the daemon at least 1 GiB of the limit"


@pytest.mark.parametrize("name", DAEMONSETS)
def test_prestop_drains_over_the_daemons_socket(name, in_pod, capsys):
    ds = daemonsets()[name]
    settings, env = in_pod(ds)
    command = container(ds)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == entrypoint()[0], "the preStop hook runs the image's runnerd"
    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"`runnerd {shlex.join(command[1:])}` does not parse with runnerd's CLI parser (the drain "
                    f"command lands with GET /ready and POST /node/drain): {capsys.readouterr().err.strip()}")
    assert args.command == "drain" and args.wait is True and args.timeout is not None
    # The CLI finds the socket as in the pod (RUNNERD_SOCKET), and it is the one the daemon binds.
    socket_path = args.socket or default_socket()
    assert socket_path == settings.socket_path == Path(env["RUNNERD_SOCKET"])
    assert len(str(socket_path)) < 108, "a unix socket path must fit sockaddr_un"
    # The drain, then SIGTERM's own drain and the engines' stop, fit inside the grace period.
    grace = pod_spec(ds)["terminationGracePeriodSeconds"]
    assert grace >= args.timeout + settings.drain_timeout + settings.stop_grace + 5, (
        f"terminationGracePeriodSeconds {grace} < drain --timeout {args.timeout:g} + drain_timeout "
        f"{settings.drain_timeout:g} + stop_grace {settings.stop_grace:g} + 5 s spare")


@pytest.mark.parametrize(("name", "path"), [("runnerd", "daemonset.yaml"), ("runnerd-gpu", "gpu/daemonset-gpu.yaml")])
def test_the_commented_node_labels_option_fits(name, path, in_pod, monkeypatch, tmp_path):
    """What the ConfigMap and the DaemonSets offer for Node Feature Discovery, commented out, works once
    uncommented: `[node] labels_file` is a setting runnerd knows, and its directory is the volume offered."""
    in_pod(daemonsets()[name])
    text = re.sub(r"(?m)^(\s*)# (\[node\]|labels_file = .*)$", r"\1\2", configmap_text())
    assert text != configmap_text()
    config = tmp_path / "with-labels.toml"
    config.write_text(text)
    monkeypatch.setenv("RUNNERD_CONFIG", str(config))
    labels_file = load_settings().node.labels_file
    assert labels_file is not None
    offered = (DEPLOY / path).read_text()
    assert f"#   mountPath: {labels_file.parent}\n" in offered and f"#     path: {labels_file.parent}\n" in offered
    assert "features-d" not in yaml.safe_dump(daemonsets()[name]), "off by default"


# === the pod, the Service, the NetworkPolicy ===========================================================

@pytest.mark.parametrize("name", DAEMONSETS)
def test_pod_hardening(name):
    ds = daemonsets()[name]
    pod = pod_spec(ds)
    user = final_stage().all("USER")[-1]
    uid, gid = (int(x) for x in user.split(":"))
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    assert container(ds)["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    # Store and cache on the node, existing beforehand (owned by the pod's user, README); the rest emptyDirs.
    kinds = {str(m.path): next(k for k in m.volume if k != "name") for m in mounts(ds)}
    assert kinds == {"/etc/runnerd": "projected", "/var/lib/runnerd": "hostPath", "/var/cache/runnerd": "hostPath",
                     "/run/runnerd": "emptyDir", "/tmp": "emptyDir"}
    for m in mounts(ds):
        if "hostPath" in m.volume:
            assert m.volume["hostPath"] == {"path": str(m.path), "type": "Directory"}
    c = container(ds)
    assert c["image"] == f"registry.example.com/runnerd:{__version__}" + ("-cuda" if name == "runnerd-gpu" else "")
    assert "command" not in c and "args" not in c, "the image's entrypoint (runnerd serve) starts the daemon"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}


def gpu_label(ds: dict[str, Any]) -> tuple[str, str]:
    ((key, value),) = pod_spec(ds)["nodeSelector"].items()
    return key, value


def test_the_gpu_variant():
    gpu = daemonsets()["runnerd-gpu"]
    pod = pod_spec(gpu)
    assert pod["runtimeClassName"] == "nvidia"
    assert gpu_label(gpu) == ("feature.node.kubernetes.io/pci-10de.present", "true")
    limits = container(gpu)["resources"]["limits"]
    assert quantity(limits["nvidia.com/gpu"]) >= 1
    requests = container(gpu)["resources"]["requests"]
    assert "nvidia.com/gpu" not in requests, "an extended resource's request is its limit"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "runtimeClassName" not in pod_spec(daemonsets()["runnerd"])


def test_each_node_gets_one_daemonset():
    """The CPU DaemonSet stays off the nodes the GPU one selects (NotIn also matches nodes without the
    label), and their selectors do not overlap: two daemons never share a node's store."""
    cpu, gpu = daemonsets()["runnerd"], daemonsets()["runnerd-gpu"]
    key, value = gpu_label(gpu)
    (term,) = pod_spec(cpu)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert {"key": key, "operator": "NotIn", "values": [value]} in term["matchExpressions"]
    assert "nodeSelector" not in pod_spec(cpu)
    for a, b in ((cpu, gpu), (gpu, cpu)):
        selector = a["spec"]["selector"]["matchLabels"]
        assert selector.items() <= a["spec"]["template"]["metadata"]["labels"].items()
        assert not selector.items() <= b["spec"]["template"]["metadata"]["labels"].items()


def test_service_is_headless_and_selects_both():
    service = one("Service", "runnerd")["spec"]
    assert service["clusterIP"] == "None"
    assert service.get("publishNotReadyAddresses", False) is False, "a draining pod must leave the DNS answers"
    for ds in daemonsets().values():
        assert service["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["ports"]
    assert port["name"] == "http", "the SRV name _http._tcp.runnerd... in the README"
    assert "_http._tcp.runnerd." in README.read_text()


def test_networkpolicy_admits_labelled_namespaces_on_the_api_port_only():
    policy = one("NetworkPolicy", "runnerd")["spec"]
    for ds in daemonsets().values():
        assert policy["podSelector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"namespaceSelector"}
    ((key, value),) = source["namespaceSelector"]["matchLabels"].items()
    assert f"kubectl label namespace front-door {key}={value}" in README.read_text()


def test_the_secret_is_named_alike_everywhere():
    """The DaemonSets mount it, the PodMonitor reads it, the README creates it: one name, one key."""
    for ds in daemonsets().values():
        (volume,) = [m.volume for m in mounts(ds) if "projected" in m.volume]
        secrets = [s["secret"] for s in volume["projected"]["sources"] if "secret" in s]
        assert secrets == [{"name": SECRET, "items": [{"key": "token", "path": "token"}]}]
        assert volume["projected"]["defaultMode"] == 0o440
    assert one("PodMonitor")["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"] == {
        "name": SECRET, "key": "token"}
    assert f"create secret generic {SECRET} --from-file=token=" in README.read_text()
    assert not [d for d in manifests() if d["kind"] == "Secret"], "no token ships with the manifests"


# === the Containerfile ==================================================================================

def test_containerfile_stages():
    global_args, stages = containerfile()
    assert [s.name for s in stages] == ["llama-server", "runnerd-venv", "runtime"]
    assert stages[0].base == "${BUILD_BASE}" and stages[1].base == stages[2].base == "${RUNTIME_BASE}", (
        "the venv is built on the image it runs in")
    assert set(global_args) == {"BUILD_BASE", "RUNTIME_BASE"}


def test_containerfile_builds_llama_server_as_install_py_does():
    build = stage("llama-server")
    args = build.args()
    assert args["LLAMA_CPP_PYTHON_VERSION"] == install.SOURCE_VERSION, (
        "the Containerfile pins another llama-cpp-python than backends/llamacpp/install.py")
    runs = build.all("RUN")
    (download,) = [r for r in runs if " download " in r]
    assert f'"{install.SOURCE_PACKAGE}==${{LLAMA_CPP_PYTHON_VERSION}}"' in download
    assert "--no-deps --no-binary :all:" in download
    assert f"'*/{install.VENDOR_PREFIX}*'" in download, "only the vendored llama.cpp tree is extracted"
    (configure,) = [r for r in runs if "cmake -S" in r]
    options = re.findall(r"-D[A-Z_]+=\S+?(?=[\s\";]|$)", configure)
    assert args["GGML_CUDA"] == "OFF"
    for cuda in (False, True):
        built = [o.replace("${GGML_CUDA}", "ON" if cuda else "OFF") for o in options]
        assert built == list(install.cmake_options(cuda))
    assert "--target llama-server" in configure
    build_dir = re.search(r"cmake -S \S+ -B (\S+)", configure)
    assert build_dir is not None
    # The whole bin/ directory (the executable and the shared libraries beside it) goes into the image,
    # at the build's own path (its RUNPATH), and RUNNERD_LLAMA_SERVER names the executable in it.
    copies = [c.split() for c in final_stage().all("COPY") if c.startswith("--from=llama-server ")]
    assert [f"{build_dir.group(1)}/bin", f"{build_dir.group(1)}/bin"] in [c[1:] for c in copies]
    assert image_env()["RUNNERD_LLAMA_SERVER"] == f"{build_dir.group(1)}/bin/llama-server"
    assert "BUILD-OPTIONS" in configure and any("BUILD-OPTIONS" in " ".join(c) for c in copies)


def test_containerfile_installs_runnerd_and_runs_it_as_a_non_root_user():
    venv = stage("runnerd-venv")
    copied = {c.split()[-1] for c in venv.all("COPY")}
    assert {"/src/", "/src/runnerd", "/src/backends"} <= copied, "pyproject.toml, README.md and both packages"
    (run,) = [r for r in venv.all("RUN") if "pip install" in r]
    venv_dir = re.search(r"python3 -m venv (\S+)", run)
    assert venv_dir is not None and " /src" in run
    runtime = final_stage()
    assert f"--from=runnerd-venv {venv_dir.group(1)} {venv_dir.group(1)}" in runtime.all("COPY")
    assert entrypoint() == [f"{venv_dir.group(1)}/bin/runnerd", "serve"]
    (user,) = runtime.all("USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "a numeric non-root user:group (runAsNonRoot checks it)"
    env = image_env()
    assert env["PATH"].startswith(f"{venv_dir.group(1)}/bin:")
    assert env["HOME"] == env["STATE_DIRECTORY"]
