"""The Kubernetes provisioner against an in-memory API server on a real port (kmock's
emulator): the exact requests it sends — method, path, query, content type, body —
and nothing else, for a Deployment and a StatefulSet, and its errors.

kmock stores objects and merges patches into them, but knows no subresources (a GET of
``.../scale`` answers the parent object) and ignores selectors, so the scale subresource
and the pod listing are served here from the stored objects, as the API server derives
them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

kmock = pytest.importorskip("kmock")
k8s = pytest.importorskip("kubernetes.client")

from scheduler.autoscale.provisioners import Instance, PoolConfig, WorkloadKind  # noqa: E402
from scheduler.autoscale.provisioners.kubernetes_api import KubernetesProvisioner, ProvisionerError  # noqa: E402
from scheduler.policy.autoscaler import AutoscalerConfig  # noqa: E402

NS = "avatarfarm"
DEPLOYMENT = "avatarfarm-worker-l4"
STATEFULSET = "avatarfarm-worker-h200"
SELECTOR = {"app": "avatarfarm-worker", "pool": "l4"}
STS_SELECTOR = {"app": "avatarfarm-worker", "pool": "h200"}
DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"
DEPLOYMENT_SCALE = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale"
STATEFULSET_SCALE = f"/apis/apps/v1/namespaces/{NS}/statefulsets/{STATEFULSET}/scale"
PODS = f"/api/v1/namespaces/{NS}/pods"
MERGE_PATCH = "application/merge-patch+json"
COST = "controller.kubernetes.io/pod-deletion-cost"
CONFIG = AutoscalerConfig(pools={
    "l4": PoolConfig(device_type="l4", namespace=NS, workload=WorkloadKind.DEPLOYMENT,
                     workload_name=DEPLOYMENT),
    "h200": PoolConfig(device_type="h200", namespace=NS, workload=WorkloadKind.STATEFULSET,
                       workload_name=STATEFULSET),
})


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    body: Any = None


def get(path: str, **query: str) -> Call:
    return Call("GET", path, query)


def patch(path: str, body: Any) -> Call:
    return Call("PATCH", path, {}, MERGE_PATCH, body)


def mark(pod: str) -> Call:
    return patch(f"{PODS}/{pod}", {"metadata": {"annotations": {COST: "-1000"}}})


def workload(name: str, replicas: int, labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels}},
            "status": {"replicas": replicas}}


def pod(name: str, labels: dict[str, str], *, namespace: str = NS, phase: str = "Running",
        deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-20T10:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


class FakeCluster:
    """kmock's emulator served by its own event loop in a thread, so the blocking client
    under test talks to it as to a real API server."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.handler: Any = None
        self.url = ""

    def __enter__(self) -> FakeCluster:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the mock API server did not start")
        if self._failed is not None:
            raise self._failed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as e:  # noqa: BLE001 - re-raised in the test thread, waiting on _ready
            self._failed = e
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            self._loop = asyncio.get_running_loop()
            self._stop = self._loop.create_future()
            self.handler = handler
            self.url = f"http://127.0.0.1:{server.port}"
            handler[kmock.subresource("scale")] << self._scale
            handler[kmock.action.LIST, kmock.resource("v1/pods")] << self._pods
            self._ready.set()
            await self._stop

    def _scale(self, request: Any) -> dict[str, Any]:
        """The Scale the API server derives from the workload (after a PATCH, the emulator
        has already merged ``spec.replicas`` into the stored workload)."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.handler.objects or self.handler.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        obj = self.handler.objects[key].raw
        labels = obj["spec"]["selector"]["matchLabels"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": request.name, "namespace": request.namespace},
                "spec": {"replicas": obj["spec"]["replicas"]},
                "status": {"replicas": obj["status"]["replicas"],
                           "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))}}

    def _pods(self, request: Any) -> dict[str, Any]:
        """The pods of the request's namespace its selectors match (equality terms only:
        anything else fails the test rather than being ignored)."""
        labels = _terms(request.params.get("labelSelector", ""))
        fields = _terms(request.params.get("fieldSelector", ""))
        if set(fields) - {"metadata.name"}:
            raise ValueError(f"unsupported field selector {fields}")
        items = []
        for (resource, namespace, name), obj in self.handler.objects.items():
            if resource != "v1/pods" or namespace != request.namespace or obj.deleted:
                continue
            pod_labels = obj.raw["metadata"].get("labels", {})
            if all(pod_labels.get(k) == v for k, v in labels.items()) and \
                    fields.get("metadata.name", name) == name:
                items.append(obj.raw)
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def put(self, resource: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.handler.objects[resource, meta["namespace"], meta["name"]] = obj

    def get(self, resource: str, name: str) -> dict[str, Any]:
        return self.handler.objects[resource, NS, name].raw

    def calls(self) -> list[Call]:
        return [Call(r.method.value, r.url.path, dict(r.params), r.headers.get("Content-Type"),
                     r.data) for r in self.handler]

    def client(self) -> Any:
        return k8s.ApiClient(k8s.Configuration(host=self.url))


def _terms(selector: str) -> dict[str, str]:
    terms = {}
    for term in filter(None, selector.split(",")):
        key, op, value = term.partition("=")
        if not op or value.startswith("=") or key.endswith("!"):
            raise ValueError(f"unsupported selector term {term!r}")
        terms[key] = value
    return terms


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    with FakeCluster() as c:
        c.put(DEPLOYMENTS, workload(DEPLOYMENT, 3, SELECTOR))
        for name in ("l4-a", "l4-b", "l4-c"):
            c.put("v1/pods", pod(name, SELECTOR))
        c.put("v1/pods", pod("l4-old", SELECTOR, deleting=True))
        c.put("v1/pods", pod("l4-done", SELECTOR, phase="Succeeded"))
        c.put("v1/pods", pod("l4-a", SELECTOR, namespace="elsewhere"))
        c.put(STATEFULSETS, workload(STATEFULSET, 11, STS_SELECTOR))
        yield c


@pytest.fixture
def provisioner(cluster: FakeCluster) -> Iterator[KubernetesProvisioner]:
    p = KubernetesProvisioner(CONFIG, cluster.client(), request_timeout_seconds=5)
    yield p
    p.close()


def statefulset_pods(cluster: FakeCluster, ordinals: Sequence[int]) -> None:
    for i in ordinals:
        cluster.put("v1/pods", pod(f"{STATEFULSET}-{i}", STS_SELECTOR))


def conflict(cluster: FakeCluster, resource: str, name: str) -> Any:
    """A 409 answer whose write is not applied (the emulator stores every PATCH before a
    reaction answers, so the answer drops that last version)."""
    def answer() -> dict[str, Any]:
        del cluster.handler.objects[resource, NS, name, -1]
        return {"kind": "Status", "code": 409, "reason": "Conflict",
                "message": "the object has been modified"}
    return answer


# -- Deployment ---------------------------------------------------------------------

def test_instances_read_the_scale_then_list_the_pods_of_its_selector(
        cluster: FakeCluster, provisioner: KubernetesProvisioner) -> None:
    assert provisioner.instances("l4") == [Instance("l4-a", "l4"), Instance("l4-b", "l4"),
                                           Instance("l4-c", "l4")]
    assert cluster.calls() == [
        get(DEPLOYMENT_SCALE),
        get(PODS, labelSelector="app=avatarfarm-worker,pool=l4"),
    ]


def test_scale_down_marks_exactly_the_drained_pods_then_lowers_replicas(
        cluster: FakeCluster, provisioner: KubernetesProvisioner) -> None:
    provisioner.scale("l4", 1, remove=["l4-b", "l4-c"])

    assert cluster.calls() == [
        mark("l4-b"),
        mark("l4-c"),
        patch(DEPLOYMENT_SCALE, {"spec": {"replicas": 1}}),
    ]
    assert cluster.get(DEPLOYMENTS, DEPLOYMENT)["spec"]["replicas"] == 1
    assert cluster.get("v1/pods", "l4-b")["metadata"]["annotations"] == {COST: "-1000"}
    assert "annotations" not in cluster.get("v1/pods", "l4-a")["metadata"]


def test_scale_up_only_sets_replicas(cluster: FakeCluster,
                                     provisioner: KubernetesProvisioner) -> None:
    provisioner.scale("l4", 5)

    assert cluster.calls() == [patch(DEPLOYMENT_SCALE, {"spec": {"replicas": 5}})]
    assert cluster.get(DEPLOYMENTS, DEPLOYMENT)["spec"]["replicas"] == 5


def test_a_deployment_removes_the_drained_pods_in_the_schedulers_order(
        cluster: FakeCluster, provisioner: KubernetesProvisioner) -> None:
    assert provisioner.removable("l4", ["l4-c", "l4-a"]) == ["l4-c", "l4-a"]
    assert cluster.calls() == []


def test_a_drained_pod_already_gone_is_skipped(cluster: FakeCluster,
                                               provisioner: KubernetesProvisioner) -> None:
    provisioner.scale("l4", 1, remove=["l4-evicted", "l4-b"])

    assert cluster.calls() == [
        mark("l4-evicted"),  # 404
        mark("l4-b"),
        patch(DEPLOYMENT_SCALE, {"spec": {"replicas": 1}}),
    ]


# -- StatefulSet --------------------------------------------------------------------

def test_a_statefulset_is_read_and_sized_through_its_own_scale_without_marks(
        cluster: FakeCluster, provisioner: KubernetesProvisioner) -> None:
    statefulset_pods(cluster, range(3))

    assert [i.worker_id for i in provisioner.instances("h200")] == [
        f"{STATEFULSET}-0", f"{STATEFULSET}-1", f"{STATEFULSET}-2"]
    provisioner.scale("h200", 1, remove=[f"{STATEFULSET}-2", f"{STATEFULSET}-1"])
    provisioner.scale("h200", 4)

    assert cluster.calls() == [
        get(STATEFULSET_SCALE),
        get(PODS, labelSelector="app=avatarfarm-worker,pool=h200"),
        patch(STATEFULSET_SCALE, {"spec": {"replicas": 1}}),
        patch(STATEFULSET_SCALE, {"spec": {"replicas": 4}}),
    ]


@pytest.mark.parametrize(("preferred", "removable"), [
    ([10, 9], [10, 9]),  # numeric order: 10 is above 9
    ([9, 10, 3], [10, 9]),  # 3 cannot leave before 8..4
    ([3, 10], [10]),
    ([9], []),  # 10 would leave first
    ([2, 9, 0, 8, 7, 6, 5, 4, 3, 1], [9, 8, 7, 6, 5, 4, 3, 2, 1]),  # 10 is already draining
    ([], []),
])
def test_a_statefulset_offers_only_its_highest_ordinals(
        cluster: FakeCluster, provisioner: KubernetesProvisioner,
        preferred: list[int], removable: list[int]) -> None:
    statefulset_pods(cluster, range(11))

    names = provisioner.removable("h200", [f"{STATEFULSET}-{i}" for i in preferred])

    assert names == [f"{STATEFULSET}-{i}" for i in removable]


# -- errors -------------------------------------------------------------------------

def refuse(cluster: FakeCluster, method: str, path: str, status: int) -> None:
    cluster.handler[method, path].override << status << {
        "kind": "Status", "code": status, "message": "refused by the test"}


@pytest.mark.parametrize(("method", "path", "status", "act"), [
    ("get", DEPLOYMENT_SCALE, 403, lambda p: p.instances("l4")),
    ("get", PODS, 500, lambda p: p.instances("l4")),
    ("patch", DEPLOYMENT_SCALE, 500, lambda p: p.scale("l4", 5)),
    ("patch", f"{PODS}/l4-b", 403, lambda p: p.scale("l4", 1, remove=["l4-b"])),
])
def test_an_api_error_names_the_workload_and_status(
        cluster: FakeCluster, provisioner: KubernetesProvisioner,
        method: str, path: str, status: int, act: Any) -> None:
    refuse(cluster, method, path, status)

    with pytest.raises(ProvisionerError) as err:
        act(provisioner)

    assert err.value.status == status
    assert err.value.workload == f"Deployment {NS}/{DEPLOYMENT}"
    assert f"Deployment {NS}/{DEPLOYMENT}" in str(err.value)
    assert str(status) in str(err.value) and "refused by the test" in str(err.value)


def test_a_refused_mark_stops_the_scale_down_before_the_count_drops(
        cluster: FakeCluster, provisioner: KubernetesProvisioner) -> None:
    refuse(cluster, "patch", f"{PODS}/l4-b", 403)

    with pytest.raises(ProvisionerError):
        provisioner.scale("l4", 1, remove=["l4-b", "l4-c"])

    assert cluster.calls() == [mark("l4-b")]
    assert cluster.get(DEPLOYMENTS, DEPLOYMENT)["spec"]["replicas"] == 3


def test_a_conflicting_scale_is_retried_once_after_rereading(
        cluster: FakeCluster, provisioner: KubernetesProvisioner) -> None:
    cluster.handler["patch", DEPLOYMENT_SCALE][:1].override << 409 << conflict(
        cluster, DEPLOYMENTS, DEPLOYMENT)

    provisioner.scale("l4", 2)

    body = {"spec": {"replicas": 2}}
    assert cluster.calls() == [patch(DEPLOYMENT_SCALE, body), get(DEPLOYMENT_SCALE),
                               patch(DEPLOYMENT_SCALE, body)]
    assert cluster.get(DEPLOYMENTS, DEPLOYMENT)["spec"]["replicas"] == 2


def test_a_second_conflict_is_an_error(cluster: FakeCluster,
                                       provisioner: KubernetesProvisioner) -> None:
    cluster.handler["patch", DEPLOYMENT_SCALE].override << 409 << conflict(
        cluster, DEPLOYMENTS, DEPLOYMENT)

    with pytest.raises(ProvisionerError) as err:
        provisioner.scale("l4", 2)

    assert err.value.status == 409
    assert len(cluster.calls()) == 3


def test_a_conflicting_mark_is_retried_once_after_rereading_the_pod(
        cluster: FakeCluster, provisioner: KubernetesProvisioner) -> None:
    cluster.handler["patch", f"{PODS}/l4-b"][:1].override << 409 << conflict(
        cluster, "v1/pods", "l4-b")

    provisioner.scale("l4", 2, remove=["l4-b"])

    assert cluster.calls() == [
        mark("l4-b"),
        get(PODS, fieldSelector="metadata.name=l4-b"),
        mark("l4-b"),
        patch(DEPLOYMENT_SCALE, {"spec": {"replicas": 2}}),
    ]


def test_an_unreachable_api_server_is_a_provisioner_error() -> None:
    with FakeCluster() as gone:
        url = gone.url
    p = KubernetesProvisioner(CONFIG, k8s.ApiClient(k8s.Configuration(host=url)),
                              request_timeout_seconds=5)
    with pytest.raises(ProvisionerError) as err:
        p.instances("l4")
    p.close()
    assert err.value.status is None and DEPLOYMENT in str(err.value)


def test_an_unknown_pool_is_a_provisioner_error(provisioner: KubernetesProvisioner) -> None:
    with pytest.raises(ProvisionerError, match="gpu"):
        provisioner.instances("gpu")


# -- client ---------------------------------------------------------------------------

def test_without_a_client_the_kubeconfig_is_used(cluster: FakeCluster, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: test, cluster: {{server: '{cluster.url}'}}}}]\n"
        "users: [{name: test, user: {token: t}}]\n"
        "contexts: [{name: test, context: {cluster: test, user: test}}]\n")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    p = KubernetesProvisioner(CONFIG)
    try:
        assert len(p.instances("l4")) == 3
    finally:
        p.close()
    assert cluster.handler[0].headers["Authorization"] == "Bearer t"


def test_no_configuration_at_all_is_a_provisioner_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))

    with pytest.raises(ProvisionerError, match="kubeconfig"):
        KubernetesProvisioner(CONFIG)


def test_close_closes_the_client(cluster: FakeCluster) -> None:
    client = cluster.client()
    p = KubernetesProvisioner(CONFIG, client)
    p.instances("l4")
    connections = client.rest_client.pool_manager.pools
    assert len(connections) == 1

    p.close()

    assert len(connections) == 0
