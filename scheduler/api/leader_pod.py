"""On Kubernetes, the leading scheduler's pod carries `avatarfarm.io/leader=true`, and
the Service tenants and workers use selects it: the route goes where the lead is.

A follower cannot be left out by its readiness instead: a Deployment whose followers
never became ready would stall every rolling update (the controller waits for the new
pods to be available). So every replica is ready when it serves its role, and the
label is what routes. A new leader takes the label from every other pod before it
puts it on its own: a leader that was paused (its pod still labelled) gets no more
calls, and a restarted container, whose pod keeps its labels, loses it too.
"""

from __future__ import annotations

import logging

from kubernetes import client as k8s

from scheduler.autoscale.provisioners.kubernetes_api import default_client

log = logging.getLogger(__name__)

LABEL = "avatarfarm.io/leader"


class LeaderPodLabel:
    def __init__(self, pod: str, api_client: k8s.ApiClient | None = None,
                 request_timeout_seconds: float = 10.0) -> None:
        """pod: "namespace/name" of this scheduler's pod (from the downward API)."""
        namespace, _, name = pod.partition("/")
        if not namespace or not name:
            raise ValueError(f"leader_pod must be NAMESPACE/NAME, not {pod!r}")
        self.namespace, self.name = namespace, name
        self._core = k8s.CoreV1Api(api_client or default_client())
        self._timeout = request_timeout_seconds

    def _set(self, pod: str, value: str | None) -> None:
        # A merge patch: null removes the label.
        self._core.patch_namespaced_pod(pod, self.namespace, {"metadata": {"labels": {LABEL: value}}},
                                        _request_timeout=self._timeout)

    def claim(self) -> None:
        """Routes to this pod alone (raises the API's error; the caller retries)."""
        others = self._core.list_namespaced_pod(self.namespace, label_selector=f"{LABEL}=true",
                                                _request_timeout=self._timeout)
        for pod in others.items:
            other = pod.metadata.name if pod.metadata is not None else None
            if other and other != self.name:
                self._set(other, None)
                log.info("took the leader label from pod %s", other)
        self._set(self.name, "true")
        log.info("pod %s/%s carries the leader label: the Service routes here",
                 self.namespace, self.name)

    def release(self) -> None:
        """A clean stop: no more calls routed here (the next leader would take it anyway)."""
        self._set(self.name, None)
