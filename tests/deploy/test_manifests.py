"""The Kubernetes manifests (deploy/kubernetes) and the KubeRay setup (deploy/ray).

Each kustomization is built here as kustomize builds it, without kubectl: its
resources, its ConfigMap generator and its patches (the few forms used; any other
field fails the build, so the builder cannot silently drift from the files). Where
kubectl is installed, its own build is compared with this one.

Every object is validated against the Kubernetes API's schemas (strict: an unknown
field fails); the custom resources (ServiceMonitor, RayCluster) are checked by
structure, and their embedded pod templates against the Pod schema. Then the
properties a change could silently break: the autoscaler's RBAC against the calls
the Kubernetes provisioner makes, GPU requests, gRPC probes on the ports the
processes listen on, a grace period longer than the worker's drain, Services that
select their pods, the pools of the scheduler's configuration against the
Deployments, and every path the processes are given against what is mounted there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from avatarfarm import config as cfg  # noqa: E402
from avatarfarm.client import read_token  # noqa: E402
from farm.cli import build_parser  # noqa: E402
from scheduler.api import auth  # noqa: E402
from scheduler.autoscale.provisioners import ProvisionerKind, WorkloadKind  # noqa: E402
from scheduler.autoscale.provisioners.ray_cluster import RayProvisioner  # noqa: E402
from scheduler.autoscale.provisioners.ray_cluster import worker_config as actor_config  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from workers.config import WorkerConfig  # noqa: E402
from workers.device.onnx import ProviderChoice  # noqa: E402
from workers.models.folder import ModelFolder, build_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
MONITORING = BASE / "monitoring"
RAY = ROOT / "deploy" / "ray"
REPLICATED = BASE / "replicated"
NAMESPACE = "avatarfarm"
# The oldest Kubernetes the manifests are for (gRPC probes are GA since 1.27) and the
# newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
GPU = "nvidia.com/gpu"
# Custom resources (Prometheus Operator, KubeRay): their schemas come with their CRDs.
CUSTOM_GROUPS = {"monitoring.coreos.com", "ray.io"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "StorageClass", "PersistentVolume"}


# -- a kustomize build of the forms these files use ------------------------------------


@dataclass
class Build:
    root: Path
    objects: list[dict[str, Any]]
    generated: dict[str, dict[str, str]]  # ConfigMap generator name -> its files
    documented_secrets: set[str]  # `kubectl create secret generic NAME` in the comments

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.root.name}: {kind} {name}: {len(found)} objects"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.all(kind))


_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator",
                         "patches"}


def kustomize(root: Path) -> Build:
    path = root / "kustomization.yaml"
    text = path.read_text()
    k = yaml.safe_load(text)
    unknown = set(k) - _KUSTOMIZATION_FIELDS
    assert not unknown, f"{path}: this test's builder does not know {sorted(unknown)}"
    assert k["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    generated: dict[str, dict[str, str]] = {}
    secrets = set(re.findall(r"create secret generic ([a-z0-9-]+)", text))
    for entry in k.get("resources", []):
        target = (root / entry).resolve()
        if target.is_dir():
            inner = kustomize(target)
            objects += inner.objects
            generated.update(inner.generated)
            secrets |= inner.documented_secrets
        else:
            objects += [o for o in yaml.safe_load_all(target.read_text()) if o]
    for gen in k.get("configMapGenerator", []):
        files = {}
        for spec in gen["files"]:
            key, _, name = spec.rpartition("=")
            files[key or Path(name).name] = (root / name).read_text()
        cm = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": gen["name"], **({"labels": gen["options"]["labels"]}
                                                    if "options" in gen else {})},
              "data": files}
        behaviour = gen.get("behavior", "create")
        existing = [o for o in objects if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"] == gen["name"]]
        assert len(existing) == (1 if behaviour == "replace" else 0), f"{path}: {gen['name']}"
        if existing:
            existing[0]["data"] = files
        else:
            objects.append(cm)
        generated[gen["name"]] = files
    for p in k.get("patches", []):
        patch = yaml.safe_load(p["patch"])
        if isinstance(patch, dict):
            assert patch.pop("$patch") == "delete", f"{path}: only deleting patches are built here"
            doomed = [o for o in objects if o["kind"] == patch["kind"]
                      and o["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(doomed) == 1, f"{path}: nothing to delete for {patch}"
            objects.remove(doomed[0])
        else:
            target = [o for o in objects if o["kind"] == p["target"]["kind"]
                      and o["metadata"]["name"] == p["target"]["name"]]
            assert len(target) == 1, f"{path}: patch target {p['target']}"
            for op in patch:
                _json_patch_add(target[0], op)
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"].setdefault("namespace", k["namespace"])
    return Build(root, objects, generated, secrets)


def _json_patch_add(obj: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation: add, replace or remove (the forms the overlays use)."""
    assert op["op"] in ("add", "replace", "remove"), f"{op['op']!r} is not built here"
    *parents, last = [p.replace("~1", "/").replace("~0", "~")
                      for p in op["path"].strip("/").split("/")]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif op["op"] == "replace":
        assert (int(last) < len(node)) if isinstance(node, list) else last in node, op["path"]
        node[int(last) if isinstance(node, list) else last] = op["value"]
    elif isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), op["value"])
    else:
        node[last] = op["value"]


@pytest.fixture(scope="module")
def base() -> Build:
    return kustomize(BASE)


@pytest.fixture(scope="module")
def monitoring() -> Build:
    return kustomize(MONITORING)


@pytest.fixture(scope="module")
def ray() -> Build:
    return kustomize(RAY)


@pytest.fixture(scope="module")
def replicated() -> Build:
    return kustomize(REPLICATED)


# -- pods, containers and what is mounted where ------------------------------------------


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec.get("initContainers", []) + pod_spec["containers"]
             if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def port(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


@dataclass(frozen=True)
class Mounted:
    volume: dict[str, Any]
    inside: PurePosixPath  # the path below the mount point
    read_only: bool


def mounted(pod_spec: dict[str, Any], c: dict[str, Any], path: Path | str) -> Mounted:
    """The volume a container sees at `path` (the deepest mount above it)."""
    target = PurePosixPath(str(path))
    best = None
    for m in c.get("volumeMounts", []):
        mount = PurePosixPath(m["mountPath"])
        if (target == mount or mount in target.parents) and \
                (best is None or len(mount.parts) > len(PurePosixPath(best["mountPath"]).parts)):
            best = m
    assert best is not None, f"{c['name']}: nothing is mounted at {target}"
    volume = next(v for v in pod_spec["volumes"] if v["name"] == best["name"])
    return Mounted(volume, target.relative_to(best["mountPath"]), bool(best.get("readOnly")))


def claim(m: Mounted) -> str:
    assert "persistentVolumeClaim" in m.volume, m.volume
    return str(m.volume["persistentVolumeClaim"]["claimName"])


def projected_item(m: Mounted) -> tuple[str, str, str]:
    """(kind, name, key) of the ConfigMap or Secret item a projected path shows."""
    for source in m.volume["projected"]["sources"]:
        for kind in ("configMap", "secret"):
            if kind in source:
                for item in source[kind]["items"]:
                    if PurePosixPath(item["path"]) == m.inside:
                        return kind, source[kind]["name"], item["key"]
    raise AssertionError(f"{m.volume['name']} shows nothing at {m.inside}")


def env_field(c: dict[str, Any], name: str) -> str:
    entry = next(e for e in c.get("env", []) if e["name"] == name)
    return str(entry["valueFrom"]["fieldRef"]["fieldPath"])


def literal_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def grpc_probe_port(c: dict[str, Any], probe: str) -> int:
    p = c[probe]
    assert set(p) & {"exec", "httpGet", "tcpSocket", "grpc"} == {"grpc"}, f"{probe}: {p}"
    assert p["grpc"].get("service", "") == "", "both processes answer health for service \"\""
    return int(p["grpc"]["port"])


def listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def load_scheduler_config(toml_text: str, tmp_path: Path, argv: list[str] | None = None
                          ) -> SchedulerConfig:
    """The scheduler's configuration as `avatarfarm scheduler ARGV` loads it, with the
    file at --config replaced by `toml_text`."""
    f = tmp_path / "scheduler.toml"
    f.write_text(toml_text)
    args = build_parser().parse_args(argv or ["scheduler", "--config", str(f)])
    args.config = f
    return cfg.load(SchedulerConfig, args=args, env_prefix="AVATARFARM_SCHEDULER_", env={})


def worker_config(c: dict[str, Any]) -> WorkerConfig:
    """The worker's configuration as the container's command line and environment give
    it (downward-API references stay as written)."""
    assert c["command"] == ["avatarfarm"], c["command"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "worker"
    return cfg.load(WorkerConfig, args=args, env_prefix="AVATARFARM_WORKER_", env=literal_env(c))


# -- schemas -------------------------------------------------------------------------------


def _pods_of_custom_resources(build: Build) -> Iterator[tuple[str, dict[str, Any]]]:
    for rc in build.all("RayCluster"):
        groups = [("head", rc["spec"]["headGroupSpec"])] + \
                 [(g["groupName"], g) for g in rc["spec"]["workerGroupSpecs"]]
        for name, group in groups:
            t = group["template"]
            yield f"RayCluster {rc['metadata']['name']} {name}", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{rc['metadata']['name']}-{name}", **t.get("metadata", {})},
                "spec": t["spec"]}


def _schema_cases() -> list[Any]:
    cases = []
    for label, root in (("base", BASE), ("ray", RAY), ("monitoring", MONITORING),
                        ("replicated", REPLICATED)):
        build = kustomize(root)
        for o in build.objects:
            if o["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
                continue  # no schema to hand: checked by structure below
            cases.append(pytest.param(o, id=f"{label}:{o['kind']}/{o['metadata']['name']}"))
        for name, pod in _pods_of_custom_resources(build):
            cases.append(pytest.param(pod, id=f"{label}:{name}"))
    return cases


@pytest.mark.parametrize("obj", _schema_cases())
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {path}: {e.message}")


def test_every_namespaced_object_is_in_the_farms_namespace(base: Build, ray: Build,
                                                           monitoring: Build) -> None:
    for build in (base, ray, monitoring):
        for o in build.objects:
            if o["kind"] in CLUSTER_SCOPED:
                continue
            assert o["metadata"]["namespace"] == NAMESPACE, (o["kind"], o["metadata"]["name"])
    assert base.get("Namespace", NAMESPACE)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("root", [BASE, RAY, MONITORING], ids=["base", "ray", "monitoring"])
def test_kubectl_kustomize_builds_the_same_objects(root: Path) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    theirs = [o for o in yaml.safe_load_all(out) if o]
    ours = kustomize(root)
    # kustomize names a generated ConfigMap NAME-<hash> and rewrites its references.
    hashed = re.compile("^(" + "|".join(map(re.escape, ours.generated)) + r")-[a-z0-9]{10}$") \
        if ours.generated else None

    def plain(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: plain(v) for k, v in o.items()}
        if isinstance(o, list):
            return [plain(v) for v in o]
        if isinstance(o, str) and hashed is not None and (m := hashed.match(o)):
            return m.group(1)
        return o

    def keyed(objs: list[dict[str, Any]]) -> dict[str, str]:
        return {f"{o['kind']}/{o['metadata']['name']}": json.dumps(o, sort_keys=True)
                for o in map(plain, objs)}

    assert keyed(ours.objects) == keyed(theirs)


# -- the scheduler --------------------------------------------------------------------------


def test_the_autoscalers_role_grants_exactly_the_provisioners_calls(base: Build) -> None:
    role = base.get("Role", "avatarfarm-autoscaler")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {
        ("apps", "deployments/scale", "get"), ("apps", "deployments/scale", "patch"),
        ("apps", "statefulsets/scale", "get"), ("apps", "statefulsets/scale", "patch"),
        ("", "pods", "list"), ("", "pods", "patch"),
    }
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"]), \
        "no resourceNames or nonResourceURLs"
    assert not base.all("ClusterRole") and not base.all("ClusterRoleBinding")
    binding = base.get("RoleBinding", "avatarfarm-autoscaler")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "avatarfarm-autoscaler"}
    sa = pod_template(base.get("Deployment", "avatarfarm-scheduler"))["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    assert base.has("ServiceAccount", sa)


# What each client method the Kubernetes provisioner may call needs from RBAC.
_CLIENT_CALLS = {
    "read_namespaced_deployment_scale": ("apps", "deployments/scale", "get"),
    "patch_namespaced_deployment_scale": ("apps", "deployments/scale", "patch"),
    "read_namespaced_stateful_set_scale": ("apps", "statefulsets/scale", "get"),
    "patch_namespaced_stateful_set_scale": ("apps", "statefulsets/scale", "patch"),
    "list_namespaced_pod": ("", "pods", "list"),
    "patch_namespaced_pod": ("", "pods", "patch"),
}


def test_the_role_covers_every_api_call_in_the_provisioners_code(base: Build) -> None:
    # The autoscaler's provisioner, and the leader's pod label (replicated schedulers).
    source = "".join((ROOT / "scheduler" / path).read_text() for path in (
        "autoscale/provisioners/kubernetes_api.py", "api/leader_pod.py"))
    called = set(re.findall(r"self\._(?:apps|core)\.(\w+)", source))
    assert called, "the provisioner's API calls were not found"
    unknown = called - set(_CLIENT_CALLS)
    assert not unknown, f"new API calls {sorted(unknown)}: grant them in scheduler-rbac.yaml " \
                        f"and add them to _CLIENT_CALLS"
    role = base.get("Role", "avatarfarm-autoscaler")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert {_CLIENT_CALLS[c] for c in called} <= granted


def test_one_scheduler_at_a_time_on_its_database(base: Build, tmp_path: Path) -> None:
    d = base.get("Deployment", "avatarfarm-scheduler")
    assert d["spec"]["replicas"] == 1
    assert d["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_template(d)["spec"]
    c = container(spec, "scheduler")
    conf = scheduler_config(base, tmp_path)
    state = mounted(spec, c, conf.database)
    assert claim(state) == "avatarfarm-scheduler-state" and not state.read_only
    pvc = base.get("PersistentVolumeClaim", "avatarfarm-scheduler-state")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def scheduler_config(build: Build, tmp_path: Path) -> SchedulerConfig:
    """The scheduler's configuration as its container loads it: --config resolved through
    the mounted projected volume to the generated ConfigMap."""
    spec = pod_template(build.get("Deployment", "avatarfarm-scheduler"))["spec"]
    c = container(spec, "scheduler")
    assert c["command"] == ["avatarfarm"] and c["args"][0] == "scheduler"
    config_path = c["args"][c["args"].index("--config") + 1]
    kind, name, key = projected_item(mounted(spec, c, config_path))
    assert kind == "configMap" and name in build.generated
    return load_scheduler_config(build.generated[name][key], tmp_path, c["args"])


def test_the_scheduler_listens_where_its_service_probes_and_monitor_look(
        base: Build, tmp_path: Path) -> None:
    conf = scheduler_config(base, tmp_path)
    d = base.get("Deployment", "avatarfarm-scheduler")
    c = container(pod_template(d)["spec"], "scheduler")
    assert conf.listen == "0.0.0.0:50051" and port(c, "grpc") == 50051
    assert conf.metrics_host == "0.0.0.0" and conf.metrics_port == port(c, "metrics") == 9464
    for probe in ("readinessProbe", "livenessProbe"):
        assert grpc_probe_port(c, probe) == listen_port(conf.listen)
    svc = base.get("Service", "avatarfarm-scheduler")
    assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert _selects(svc["spec"]["selector"], pod_template(d)["metadata"]["labels"])
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == 9464 and ports["metrics"]["targetPort"] == "metrics"


def test_the_scheduler_authenticates_with_the_signing_key_secret(base: Build,
                                                                 tmp_path: Path) -> None:
    conf = scheduler_config(base, tmp_path)
    spec = pod_template(base.get("Deployment", "avatarfarm-scheduler"))["spec"]
    c = container(spec, "scheduler")
    assert not conf.allow_insecure
    assert conf.token_secret_file is not None
    kind, name, key = projected_item(mounted(spec, c, conf.token_secret_file))
    assert (kind, name, key) == ("secret", "avatarfarm-token-key", "token.key")
    assert name in base.documented_secrets


def test_the_scheduler_writes_avatars_where_the_workers_read_them(base: Build,
                                                                  tmp_path: Path) -> None:
    conf = scheduler_config(base, tmp_path)
    spec = pod_template(base.get("Deployment", "avatarfarm-scheduler"))["spec"]
    written = mounted(spec, container(spec, "scheduler"), conf.avatar_dir)
    assert claim(written) == "avatarfarm-avatars" and written.inside == PurePosixPath(".")
    assert not written.read_only
    wspec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    w = container(wspec, "worker")
    read = mounted(wspec, w, worker_config(w).model_dir / "avatars")
    assert claim(read) == "avatarfarm-avatars" and read.inside == PurePosixPath(".")
    pvc = base.get("PersistentVolumeClaim", "avatarfarm-avatars")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# -- the workers ----------------------------------------------------------------------------


def test_a_worker_holds_one_gpu_and_cpu_for_encoding(base: Build) -> None:
    d = base.get("Deployment", "avatarfarm-worker")
    res = container(pod_template(d)["spec"], "worker")["resources"]
    assert res["limits"][GPU] == 1
    assert GPU not in res.get("requests", {}) or res["requests"][GPU] == 1
    assert res["requests"]["cpu"] and res["requests"]["memory"]
    # The autoscaler owns the count: the manifest must not reset it on every apply.
    assert "replicas" not in d["spec"]


def test_a_worker_s_encoder_processes_have_shared_memory_for_their_frame_rings(base: Build) -> None:
    from workers.output.encoder_process import RING

    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    c = container(spec, "worker")
    assert worker_config(c).encoder_processes != 0  # the manifest keeps the worker's default
    shm = mounted(spec, c, "/dev/shm")
    assert shm.inside == PurePosixPath(".") and not shm.read_only
    assert shm.volume["emptyDir"]["medium"] == "Memory"
    # Rooms of a 720p worker fit, well past what one worker streams at 720p.
    limit = shm.volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and int(limit[:-2]) * 2**30 >= 100 * RING * 1280 * 720 * 3


def test_a_worker_is_named_after_its_pod_and_reachable_at_its_ip(base: Build) -> None:
    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    c = container(spec, "worker")
    conf = worker_config(c)
    assert conf.worker_id == "$(POD_NAME)" and env_field(c, "POD_NAME") == "metadata.name"
    assert conf.advertise_host == "$(POD_IP)" and env_field(c, "POD_IP") == "status.podIP"
    assert conf.listen == "0.0.0.0:50061" and port(c, "live-input") == 50061
    assert conf.metrics_host == "0.0.0.0" and conf.metrics_port == port(c, "metrics")
    assert conf.provider is ProviderChoice.CUDA


def test_a_worker_reaches_the_scheduler_through_its_service(base: Build) -> None:
    c = container(pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"], "worker")
    host, _, svc_port = worker_config(c).scheduler.rpartition(":")
    svc = base.get("Service", host)
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert int(svc_port) == grpc_port["port"]
    assert svc is base.get("Service", "avatarfarm-scheduler")


def test_worker_probes_are_grpc_on_the_port_it_listens_on(base: Build) -> None:
    c = container(pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"], "worker")
    live = listen_port(worker_config(c).listen)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert grpc_probe_port(c, probe) == live, probe


def test_the_grace_period_outlasts_the_workers_drain(base: Build) -> None:
    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    drain = worker_config(container(spec, "worker")).drain_timeout
    assert drain > 0, "a worker leaving must hand its rooms over"
    # Room for the final usage reports and the servers' own grace after the drain.
    assert spec["terminationGracePeriodSeconds"] >= drain + 15


def test_a_worker_mints_its_own_token_and_never_holds_the_key(base: Build) -> None:
    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    w = container(spec, "worker")
    conf = worker_config(w)
    assert conf.token_file is not None
    token = mounted(spec, w, conf.token_file)
    assert token.volume["emptyDir"].get("medium") == "Memory" and token.read_only
    # The first token before the worker starts; then renewed beside it.
    minter, renewer = container(spec, "worker-token"), container(spec, "worker-token-renewer")
    assert minter in spec["initContainers"] and renewer in spec["containers"]
    for c in (minter, renewer):
        script = " ".join(c["command"] + c["args"])
        assert f"--out {conf.token_file}" in script and '--worker "$POD_NAME"' in script
        assert env_field(c, "POD_NAME") == "metadata.name"
        assert mounted(spec, c, conf.token_file).volume is token.volume
        key_file = re.search(r"--secret-file (\S+)", script)
        assert key_file is not None
        key = mounted(spec, c, key_file.group(1))
        assert key.volume["secret"]["secretName"] == "avatarfarm-token-key"
        assert key.volume["secret"]["secretName"] in base.documented_secrets
    mounts_of_worker = {m["name"] for m in w["volumeMounts"]}
    assert key.volume["name"] not in mounts_of_worker
    script = " ".join(renewer["args"])
    ttl, every = (float(re.search(rf"--{opt} (\S+)", script).group(1))  # type: ignore[union-attr]
                  for opt in ("ttl", "renew-every"))
    assert 0 < every <= ttl / 2, "a token is renewed well before it expires"


def test_the_minted_token_lets_the_pod_register_under_its_own_name(base: Build,
                                                                    tmp_path: Path) -> None:
    """Runs the init container's script as written, its mounts moved under tmp_path."""
    cli = Path(sys.executable).with_name("avatarfarm")
    if not cli.exists():
        pytest.skip("the avatarfarm command is not installed next to this Python")
    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    minter = container(spec, "worker-token")
    script = minter["args"][0]
    for m in minter["volumeMounts"]:
        (tmp_path / m["name"]).mkdir()
        script = script.replace(m["mountPath"], str(tmp_path / m["name"]))
    key_file = tmp_path / "token-key" / "token.key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    pod = "avatarfarm-worker-5d8c7b9f4-x2k7q"
    env = {**os.environ, "POD_NAME": pod, "PATH": f"{cli.parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([*minter["command"], script], env=env, check=True, timeout=60)
    token_file = tmp_path / "token" / "worker.token"

    def check() -> None:
        assert token_file.stat().st_mode & 0o077 == 0, "only the pod's user reads its token"
        claims = auth.verify_token(auth.read_signing_key(key_file), read_token(token_file),
                                   now=time.time())
        auth.check_worker_id(claims.principal(), pod)
        assert claims.expires_at - claims.issued_at >= 3600

    check()
    # The renewer, as written: it replaces the file at once, then on its period.
    renewer = container(spec, "worker-token-renewer")
    script = renewer["args"][0]
    for m in renewer["volumeMounts"]:
        script = script.replace(m["mountPath"], str(tmp_path / m["name"]))
    token_file.unlink()
    proc = subprocess.Popen([*renewer["command"], script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not token_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no token written"
            time.sleep(0.05)
        check()
        assert proc.poll() is None, "the renewer keeps running"
    finally:
        proc.kill()
        proc.wait()


def test_models_are_built_into_the_folder_the_worker_loads(base: Build) -> None:
    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    w = container(spec, "worker")
    model_dir = worker_config(w).model_dir
    builder = container(spec, "build-models")
    assert builder in spec["initContainers"]
    args = build_parser().parse_args(builder["args"])
    assert args.command == "build-models" and args.out == model_dir
    assert mounted(spec, builder, args.out).volume is mounted(spec, w, model_dir).volume
    # The default avatar goes to the shared folder, where the scheduler sees it too.
    assert claim(mounted(spec, builder, args.out / "avatars")) == "avatarfarm-avatars"


def test_the_model_build_gives_a_folder_the_worker_opens(base: Build, tmp_path: Path) -> None:
    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    args = build_parser().parse_args(container(spec, "build-models")["args"])
    folder = build_reference(tmp_path / "models", args.preset, force=args.force,
                             wav2lip=None if args.wav2lip == "none" else args.wav2lip)
    assert folder.wav2lip is not None and folder.wav2lip.path.is_file()
    assert ModelFolder.open(folder.root).avatar_ids() == ["presenter"]


def test_outputs_are_shared_so_a_room_continues_on_another_worker(base: Build) -> None:
    spec = pod_template(base.get("Deployment", "avatarfarm-worker"))["spec"]
    w = container(spec, "worker")
    out = mounted(spec, w, worker_config(w).output_dir)
    assert claim(out) == "avatarfarm-outputs" and not out.read_only
    pvc = base.get("PersistentVolumeClaim", "avatarfarm-outputs")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_each_autoscaler_pool_names_a_deployment_of_its_workers(base: Build,
                                                                tmp_path: Path) -> None:
    pools = scheduler_config(base, tmp_path).autoscaler
    assert pools.provisioner is ProvisionerKind.KUBERNETES and pools.pools
    for name, pool in pools.pools.items():
        assert pool.workload is WorkloadKind.DEPLOYMENT and pool.namespace == NAMESPACE
        d = base.get(pool.workload.value, pool.workload_name)
        assert d["metadata"]["namespace"] == pool.namespace
        assert d["metadata"]["labels"]["avatarfarm.io/pool"] == name
        assert d["spec"]["selector"]["matchLabels"]["avatarfarm.io/pool"] == name
        assert _selects(d["spec"]["selector"]["matchLabels"],
                        pod_template(d)["metadata"]["labels"])
        conf = worker_config(container(pod_template(d)["spec"], "worker"))
        # The autoscaler counts a registered worker in the pool of its device type.
        assert conf.device_type == pool.device_type
        assert pool.min_workers >= 1 or pool.units_per_worker > 0, \
            "a pool that may be empty needs units_per_worker to grow from zero"


def test_every_claim_and_secret_a_pod_uses_exists_or_is_documented(base: Build,
                                                                   ray: Build) -> None:
    for build in (base, ray):
        specs = [pod_template(d)["spec"] for d in build.all("Deployment")]
        specs += [pod["spec"] for _, pod in _pods_of_custom_resources(build)]
        for spec in specs:
            for v in spec.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert build.has("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
                if "secret" in v:
                    assert v["secret"]["secretName"] in build.documented_secrets, v
                for source in v.get("projected", {}).get("sources", []):
                    if "secret" in source:
                        assert source["secret"]["name"] in build.documented_secrets
                    if "configMap" in source:
                        assert source["configMap"]["name"] in build.generated
            for c in spec.get("initContainers", []) + spec["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] in build.documented_secrets, e


def test_pods_run_unprivileged_as_the_images_user(base: Build, ray: Build) -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["avatarfarm"\]$', dockerfile, re.M)
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user is not None
    specs = [pod_template(d)["spec"] for d in base.all("Deployment")]
    specs += [pod["spec"] for _, pod in _pods_of_custom_resources(ray)]
    for spec in specs:
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] and (str(sc["runAsUser"]), str(sc["runAsGroup"])) == user.groups()
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
            # GPU pods pull one image: the GPU build (onnxruntime-gpu), for every container.
            uses_gpu = any(GPU in x.get("resources", {}).get("limits", {})
                           for x in spec["containers"])
            assert c["image"].split(":")[0] == ("avatarfarm-gpu" if uses_gpu else "avatarfarm")


# -- monitoring -----------------------------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _matches(label_selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not _selects(label_selector.get("matchLabels", {}), labels):
        return False
    for e in label_selector.get("matchExpressions", []):
        assert e["operator"] in ("In", "NotIn", "Exists", "DoesNotExist")
        value = labels.get(e["key"])
        ok = {"In": value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels}
        if not ok[e["operator"]]:
            return False
    return True


def test_the_service_monitor_scrapes_the_scheduler_and_every_worker(base: Build,
                                                                    monitoring: Build) -> None:
    (sm,) = monitoring.objects
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    scraped = [s for s in base.all("Service") if _matches(sm["spec"]["selector"],
                                                          s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in scraped} == {"avatarfarm-scheduler", "avatarfarm-workers"}
    assert "jobLabel" not in sm["spec"]
    endpoint_ports = {e["port"] for e in sm["spec"]["endpoints"]}
    assert endpoint_ports == {"metrics"}
    for s in scraped:
        assert "metrics" in {p["name"] for p in s["spec"]["ports"]}
    worker_svc = base.get("Service", "avatarfarm-workers")
    worker = base.get("Deployment", "avatarfarm-worker")
    assert _selects(worker_svc["spec"]["selector"], pod_template(worker)["metadata"]["labels"])
    assert worker_svc["spec"]["ports"][0]["targetPort"] == "metrics"
    # A draining or starting worker still reports.
    assert worker_svc["spec"]["publishNotReadyAddresses"] is True
    for label in sm["spec"].get("podTargetLabels", []):
        assert label in pod_template(worker)["metadata"]["labels"]


def test_the_service_monitor_gives_the_jobs_of_the_plain_scrape_config(base: Build,
                                                                        monitoring: Build) -> None:
    # The job label is the Service's name. The rules and the dashboard read the same
    # series whether Prometheus is set up by hand or by its operator.
    plain = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    if not plain.exists():
        pytest.skip("no deploy/prometheus/prometheus.yml")
    jobs = {j["job_name"] for j in yaml.safe_load(plain.read_text())["scrape_configs"]}
    (sm,) = monitoring.objects
    scraped = {s["metadata"]["name"] for s in base.all("Service")
               if _matches(sm["spec"]["selector"], s["metadata"]["labels"])}
    assert scraped <= jobs
    assert all(j.startswith("avatarfarm") for j in scraped), "the target-down alert's selector"


# -- Ray --------------------------------------------------------------------------------------


def test_the_ray_farm_replaces_the_worker_deployment_with_a_ray_cluster(ray: Build,
                                                                         tmp_path: Path) -> None:
    assert not ray.has("Deployment", "avatarfarm-worker")
    assert not ray.all("Role") and not ray.all("RoleBinding")
    conf = scheduler_config(ray, tmp_path)
    assert conf.autoscaler.provisioner is ProvisionerKind.RAY
    (rc,) = ray.all("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    # The scheduler reaches Ray Client on the head's Service, <cluster>-head-svc.
    m = re.fullmatch(r"ray://([a-z0-9-]+):(\d+)", conf.autoscaler.ray_address)
    assert m is not None and m.group(1) == f"{rc['metadata']['name']}-head-svc"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert int(m.group(2)) == port(head, "client")
    # Both sides of Ray's token authentication read the same Secret.
    auth = rc["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] in ray.documented_secrets
    sched = container(pod_template(ray.get("Deployment", "avatarfarm-scheduler"))["spec"],
                      "scheduler")
    env = {e["name"]: e for e in sched["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": auth["secretName"], "key": "auth_token"}


def test_ray_groups_give_ray_the_gpus_they_hold(ray: Build) -> None:
    (rc,) = ray.all("RayCluster")
    spec = rc["spec"]
    # Ray Client (the scheduler) and the cluster must run the same Ray: the image's lock.
    for lock in ("image.txt", "image-gpu.txt"):
        pinned = re.search(r"^ray==(\S+)", (ROOT / "requirements" / lock).read_text(), re.M)
        assert pinned is not None and spec["rayVersion"] == pinned.group(1), lock
    assert isinstance(spec["enableInTreeAutoscaling"], bool)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in [head, *groups]:
        # KubeRay passes rayStartParams as strings: a YAML number here is rejected.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (c,) = g["template"]["spec"]["containers"]
        assert float(g["rayStartParams"]["num-gpus"]) == c["resources"]["limits"][GPU] >= 1


def test_ray_worker_actors_start_with_what_their_nodes_mount(ray: Build, tmp_path: Path) -> None:
    conf = scheduler_config(ray, tmp_path).autoscaler
    # Validates every pool's worker_args as the scheduler does at start (no connection).
    RayProvisioner(conf, "avatarfarm-scheduler:50051")
    (rc,) = ray.all("RayCluster")
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    for name, pool in conf.pools.items():
        group = groups[name]
        spec = group["template"]["spec"]
        (node,) = spec["containers"]
        assert group["template"]["metadata"]["labels"]["avatarfarm.io/pool"] == name
        gpus = float(group["rayStartParams"]["num-gpus"])
        assert 0 < pool.ray_num_gpus <= gpus
        assert pool.max_workers <= group["maxReplicas"] * int(gpus / pool.ray_num_gpus)
        argv = ["--device-type", pool.device_type, *pool.worker_args,
                "--scheduler", "avatarfarm-scheduler:50051", "--worker-id", f"{name}-00000000"]
        w = actor_config(argv, env=literal_env(node))
        assert w.advertise_host == "$(POD_IP)" and env_field(node, "POD_IP") == "status.podIP"
        assert listen_port(w.listen) == 0, "workers sharing a node need a port each"
        assert w.provider is ProviderChoice.CUDA
        assert mounted(spec, node, w.model_dir).volume["name"] == "models"
        assert claim(mounted(spec, node, w.model_dir / "avatars")) == "avatarfarm-avatars"
        assert claim(mounted(spec, node, w.output_dir)) == "avatarfarm-outputs"
        assert w.token_file is not None
        token = mounted(spec, node, w.token_file)
        assert token.volume["secret"]["secretName"] in ray.documented_secrets
        builder = container(spec, "build-models")
        assert build_parser().parse_args(builder["args"]).out == w.model_dir


def test_both_scheduler_configurations_load_with_the_real_cli(tmp_path: Path) -> None:
    for toml in (BASE / "scheduler.toml", RAY / "scheduler-ray.toml"):
        conf = load_scheduler_config(toml.read_text(), tmp_path)
        assert conf.autoscaler.enabled, toml
        assert set(conf.device_prices) >= {p.device_type for p in conf.autoscaler.pools.values()}


def test_the_schema_cases_cover_every_built_object(base: Build) -> None:
    # A kind left out of the schemas would silently skip validation.
    names = {p.id for p in _schema_cases()}
    for o in base.objects:
        assert f"base:{o['kind']}/{o['metadata']['name']}" in names


# -- replicated schedulers on PostgreSQL (deploy/kubernetes/replicated) ----------------------


def replicated_config(build: Build, tmp_path: Path) -> tuple[SchedulerConfig, dict[str, Any]]:
    """The replicas' configuration as their container loads it (file, then environment;
    downward-API references stay as written), and the container."""
    spec = pod_template(build.get("Deployment", "avatarfarm-scheduler"))["spec"]
    c = container(spec, "scheduler")
    config_path = c["args"][c["args"].index("--config") + 1]
    kind, name, key = projected_item(mounted(spec, c, config_path))
    assert kind == "configMap"
    f = tmp_path / "scheduler.toml"
    f.write_text(build.generated[name][key])
    args = build_parser().parse_args(c["args"])
    args.config = f
    return cfg.load(SchedulerConfig, args=args, env_prefix="AVATARFARM_SCHEDULER_",
                    env=literal_env(c)), c


def test_replicas_share_a_postgres_store_and_keep_nothing_on_the_pod(replicated: Build,
                                                                    tmp_path: Path) -> None:
    d = replicated.get("Deployment", "avatarfarm-scheduler")
    assert d["spec"]["replicas"] >= 2
    assert d["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not replicated.has("PersistentVolumeClaim", "avatarfarm-scheduler-state")
    spec = pod_template(d)["spec"]
    conf, c = replicated_config(replicated, tmp_path)
    assert conf.database_url.startswith("postgresql://") and "@avatarfarm-postgres:" in conf.database_url
    assert ":" not in conf.database_url.split("//")[1].split("@")[0], "no password in the URL"
    pg = next(e for e in c["env"] if e["name"] == "PGPASSWORD")["valueFrom"]["secretKeyRef"]
    assert pg["name"] in replicated.documented_secrets
    # Every replica derives the same live-input keys: one secret, mounted in each.
    assert conf.input_secret_file is not None
    assert projected_item(mounted(spec, c, conf.input_secret_file))[:2] == \
        ("secret", "avatarfarm-input-key")
    assert "avatarfarm-input-key" in replicated.documented_secrets
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert mounts == {v["name"] for v in spec["volumes"]}
    assert all("persistentVolumeClaim" not in v or v["persistentVolumeClaim"]["claimName"] !=
               "avatarfarm-scheduler-state" for v in spec["volumes"])


def test_the_service_routes_to_the_leaders_pod_and_every_replica_is_ready(replicated: Build,
                                                                        tmp_path: Path) -> None:
    from scheduler.api.follower import REPLICA_HEALTH
    from scheduler.api.leader_pod import LABEL

    d = replicated.get("Deployment", "avatarfarm-scheduler")
    conf, c = replicated_config(replicated, tmp_path)
    assert conf.leader_pod == "$(POD_NAMESPACE)/$(POD_NAME)"
    assert env_field(c, "POD_NAMESPACE") == "metadata.namespace"
    assert env_field(c, "POD_NAME") == "metadata.name"
    assert conf.advertise_address == f"$(POD_IP):{listen_port(conf.listen)}"
    assert env_field(c, "POD_IP") == "status.podIP"
    svc = replicated.get("Service", "avatarfarm-scheduler")
    pod_labels = pod_template(d)["metadata"]["labels"]
    assert svc["spec"]["selector"] == {**d["spec"]["selector"]["matchLabels"], LABEL: "true"}
    assert not _selects(svc["spec"]["selector"], pod_labels)  # only once a leader labels it
    assert _selects(svc["spec"]["selector"], {**pod_labels, LABEL: "true"})
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": listen_port(conf.listen), "service": REPLICA_HEALTH}
    # The leader patches pods with the Role the autoscaler's calls already need.
    role = replicated.get("Role", "avatarfarm-autoscaler")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert {("", "pods", "list"), ("", "pods", "patch")} <= granted
