"""The leader's pod label, against an in-memory Kubernetes API server on a real port:
a new leader takes the label from every other pod, a paused leader's included, then
puts it on its own; a clean stop takes it off."""

from __future__ import annotations

import pytest

pytest.importorskip("kmock")

from scheduler.api.leader_pod import LABEL, LeaderPodLabel
from tests.scheduler.autoscale.test_kubernetes_provisioner import NS, FakeCluster, pod

APP = {"app.kubernetes.io/component": "scheduler"}


def labels(cluster: FakeCluster, name: str) -> dict[str, str]:
    return dict(cluster.get("v1/pods", name)["metadata"].get("labels") or {})


def test_the_leader_label_moves_to_the_new_leaders_pod_alone() -> None:
    with FakeCluster() as cluster:
        cluster.put("v1/pods", pod("scheduler-a", {**APP, LABEL: "true"}))  # a paused old leader
        cluster.put("v1/pods", pod("scheduler-b", dict(APP)))
        cluster.put("v1/pods", pod("scheduler-c", dict(APP)))
        cluster.put("v1/pods", pod("scheduler-x", {**APP, LABEL: "true"}, namespace="elsewhere"))
        route = LeaderPodLabel(f"{NS}/scheduler-b", cluster.client(), request_timeout_seconds=5)
        route.claim()
        assert labels(cluster, "scheduler-b") == {**APP, LABEL: "true"}
        assert LABEL not in labels(cluster, "scheduler-a")  # the old one gets no more calls
        assert LABEL not in labels(cluster, "scheduler-c")
        assert cluster.handler.objects["v1/pods", "elsewhere", "scheduler-x"].raw["metadata"][
            "labels"][LABEL] == "true"  # another namespace's pods are not ours
        route.release()
        assert labels(cluster, "scheduler-b") == APP


def test_the_pod_is_named_with_its_namespace() -> None:
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        LeaderPodLabel("scheduler-b", object())  # type: ignore[arg-type]
