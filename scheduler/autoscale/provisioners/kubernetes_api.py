"""The Kubernetes provisioner: a pool is a Deployment or StatefulSet, sized through its
``scale`` subresource with the official client.

A pool's workers are the pods its workload's selector matches; a worker registers with
its pod name as id, so the two are matched by name. The calls made are exactly those
the RBAC in ``deploy/`` grants, in the pool's namespace: get and patch of
``deployments/scale`` or ``statefulsets/scale``, list and patch of ``pods``. Pods are
never deleted here: the workload's controller removes them when the count goes down.

Which pods leave:
- Deployment: each drained pod is first annotated with a pod-deletion-cost far below
  the default of 0, then the replica count is lowered; the ReplicaSet removes the
  lowest-cost pods first, so exactly the drained ones go.
- StatefulSet: the controller always removes the highest ordinals, so only those are
  offered as removable and nothing is annotated.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from scheduler.autoscale.provisioners import Instance, PoolConfig, ProvisionerKind, WorkloadKind
from scheduler.policy.autoscaler import AutoscalerConfig

log = logging.getLogger(__name__)

# Pods without the annotation count as 0; the ReplicaSet removes lower costs first.
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DRAINED_DELETION_COST = "-1000"

# A JSON merge patch (RFC 7386): a partial object, exactly what is sent; the client
# would otherwise pick a content type by its own rules.
_MERGE_PATCH = "application/merge-patch+json"

# Pods in these phases stay listed until collected but run no worker any more.
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})

_T = TypeVar("_T")


class ProvisionerError(RuntimeError):
    """A call to the engine failed. ``workload`` names what was being sized
    (``"Deployment ns/name"``), ``status`` is the API's HTTP status (None when the API
    server did not answer)."""

    def __init__(self, message: str, *, workload: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.workload = workload
        self.status = status


@dataclass(frozen=True, slots=True)
class _Workload:
    pool: str
    kind: WorkloadKind
    namespace: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.kind.value} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class _Scale:
    replicas: int
    selector: str


class KubernetesProvisioner:
    """Sizes each pool's workload through its scale subresource. Calls block (HTTP to the
    API server); the autoscaler makes them from one worker thread at a time."""

    kind = ProvisionerKind.KUBERNETES

    def __init__(self, config: AutoscalerConfig, api_client: k8s.ApiClient | None = None, *,
                 request_timeout_seconds: float = 30.0) -> None:
        """``api_client`` None: the in-cluster service account when running in a pod
        (``KUBERNETES_SERVICE_HOST`` set), else the kubeconfig (``KUBECONFIG`` or the
        default file). The provisioner owns the client: ``close()`` closes it."""
        if request_timeout_seconds <= 0:
            raise ValueError("request_timeout_seconds must be positive")
        self._pools: dict[str, PoolConfig] = dict(config.pools)
        self._timeout = request_timeout_seconds
        self._api = api_client if api_client is not None else default_client()
        self._apps = k8s.AppsV1Api(self._api)
        self._core = k8s.CoreV1Api(self._api)

    def instances(self, pool: str) -> list[Instance]:
        w = self._workload(pool)
        scale = self._read_scale(w)
        pods = self._call(w, "listing its pods", lambda: self._core.list_namespaced_pod(
            w.namespace, label_selector=scale.selector, _request_timeout=self._timeout))
        names = []
        for pod in pods.items:
            meta = pod.metadata
            if meta is None or not meta.name or meta.deletion_timestamp is not None:
                continue  # already leaving: the controller has replaced it in the count
            if pod.status is not None and pod.status.phase in _FINISHED_PHASES:
                continue
            names.append(meta.name)
        return [Instance(name, pool) for name in sorted(names)]

    def scale(self, pool: str, replicas: int, remove: Sequence[str] = ()) -> None:
        if replicas < 0:
            raise ValueError("replicas must not be negative")
        w = self._workload(pool)
        if w.kind is WorkloadKind.DEPLOYMENT:
            # Marks first: once the count drops, the ReplicaSet picks at once. A failure
            # leaves the marks in place on purpose: an ambiguous failure of the count
            # change may still have lowered it, and only drained pods may then be chosen.
            for name in dict.fromkeys(remove):
                self._mark_for_removal(w, name)
        self._set_replicas(w, replicas)

    def removable(self, pool: str, preferred: Sequence[str]) -> list[str]:
        w = self._workload(pool)
        if w.kind is WorkloadKind.DEPLOYMENT:
            return list(preferred)
        if not preferred:
            return []
        # Lowering the count by k removes the k highest ordinals. The pool's pods not in
        # ``preferred`` are the ones already leaving (draining, booting), so of the
        # preferred, those among the top len(preferred) ordinals can go, highest first.
        pattern = re.compile(re.escape(w.name) + r"-(\d+)")
        by_ordinal = sorted(((int(m.group(1)), i.worker_id) for i in self.instances(pool)
                             if (m := pattern.fullmatch(i.worker_id))), reverse=True)
        wanted = set(preferred)
        return [name for _, name in by_ordinal[:len(preferred)] if name in wanted]

    def close(self) -> None:
        self._api.close()

    # -- the API calls -------------------------------------------------------------

    def _workload(self, pool: str) -> _Workload:
        try:
            cfg = self._pools[pool]
        except KeyError:
            raise ProvisionerError(f"no pool named {pool!r} in [autoscaler.pools]") from None
        return _Workload(pool, cfg.workload, cfg.namespace, cfg.workload_name)

    def _read_scale(self, w: _Workload) -> _Scale:
        read = (self._apps.read_namespaced_deployment_scale if w.kind is WorkloadKind.DEPLOYMENT
                else self._apps.read_namespaced_stateful_set_scale)
        scale = self._call(w, "reading its scale", lambda: read(
            w.name, w.namespace, _request_timeout=self._timeout))
        selector = scale.status.selector if scale.status is not None else None
        if not selector:
            # An empty selector would list every pod in the namespace as a worker.
            raise ProvisionerError(f"{w.label}: its scale reports no pod selector",
                                   workload=w.label)
        replicas = scale.spec.replicas if scale.spec is not None else None
        return _Scale(replicas or 0, selector)

    def _set_replicas(self, w: _Workload, replicas: int) -> None:
        patch = (self._apps.patch_namespaced_deployment_scale
                 if w.kind is WorkloadKind.DEPLOYMENT
                 else self._apps.patch_namespaced_stateful_set_scale)
        body = {"spec": {"replicas": replicas}}

        def send() -> None:
            self._call(w, f"setting replicas to {replicas}", lambda: patch(
                w.name, w.namespace, body, _content_type=_MERGE_PATCH,
                _request_timeout=self._timeout))

        try:
            send()
        except ProvisionerError as e:
            if e.status != 409:
                raise
            # Conflicted with a concurrent write: re-read, then try once more unless the
            # count is already where it should be.
            if self._read_scale(w).replicas == replicas:
                return
            send()
        log.info("%s: replicas set to %d", w.label, replicas)

    def _mark_for_removal(self, w: _Workload, pod: str) -> None:
        body = {"metadata": {"annotations": {DELETION_COST_ANNOTATION: DRAINED_DELETION_COST}}}

        def send() -> None:
            self._call(w, f"marking pod {pod} for removal", lambda: self._core.patch_namespaced_pod(
                pod, w.namespace, body, _content_type=_MERGE_PATCH,
                _request_timeout=self._timeout))

        try:
            send()
        except ProvisionerError as e:
            if e.status == 404:
                # Already gone (crashed, evicted): nothing left to mark, and the count
                # the autoscaler asks for still holds.
                log.info("%s: pod %s to remove is already gone", w.label, pod)
                return
            if e.status != 409:
                raise
            if not self._pod_present(w, pod):
                return
            send()

    def _pod_present(self, w: _Workload, pod: str) -> bool:
        """Re-reads one pod with the list verb (the RBAC grants no get on pods)."""
        pods = self._call(w, f"re-reading pod {pod}", lambda: self._core.list_namespaced_pod(
            w.namespace, field_selector=f"metadata.name={pod}", _request_timeout=self._timeout))
        return any(p.metadata is not None and p.metadata.deletion_timestamp is None
                   for p in pods.items)

    def _call(self, w: _Workload, doing: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except k8s.ApiException as e:
            raise ProvisionerError(f"{w.label}: {doing} failed: HTTP {e.status} {e.reason or ''}"
                                   f"{_status_message(e.body)}", workload=w.label,
                                   status=e.status) from e
        except urllib3.exceptions.HTTPError as e:
            raise ProvisionerError(f"{w.label}: {doing} failed: the API server did not answer "
                                   f"({e})", workload=w.label) from e


def _status_message(body: object) -> str:
    """The message of the API's Status answer, if it sent one."""
    if not isinstance(body, str | bytes) or not body:
        return ""
    try:
        status = json.loads(body)
    except ValueError:
        return ""
    message = status.get("message") if isinstance(status, dict) else None
    return f": {message[:300]}" if isinstance(message, str) and message else ""


def default_client() -> k8s.ApiClient:
    """The client for where the scheduler runs, read now rather than at import, so a
    changed environment (a test, a re-exec) is honoured."""
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = k8s.Configuration()
            k8s_config.load_incluster_config(client_configuration=configuration)
            return k8s.ApiClient(configuration)
        # persist_config=False: a token refresh must not rewrite the operator's kubeconfig.
        return k8s_config.new_client_from_config(
            config_file=os.environ.get("KUBECONFIG") or "~/.kube/config", persist_config=False)
    except (k8s_config.ConfigException, OSError) as e:
        raise ProvisionerError(f"no Kubernetes API configuration (in-cluster service account "
                               f"or kubeconfig): {e}") from e
