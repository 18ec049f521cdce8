"""The Ray provisioner against a real local Ray cluster and a real scheduler: worker
actors holding half a GPU and no CPU start real workers that register with the
scheduler; removing one stops its worker gracefully and frees its actor; a new
provisioner (a restarted scheduler) finds the remaining worker by its actor name.

The cluster is started by the test (``ray start --head --block`` in its own
process group, its own temp folder and ports, token authentication on with a
token of its own) and stopped through that process: SIGTERM makes it shut down
exactly the processes it started."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scheduler.autoscale.provisioners import PoolConfig, ProvisionerKind
from scheduler.config import SchedulerConfig
from scheduler.policy.autoscaler import AutoscalerConfig
from scheduler.server import start

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="ray is not installed (the `ray` extra)")]

NAMESPACE = "avatarfarm-test"


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: all held open at once while they are chosen (ports
    asked for one after another may come back the same, and Ray refuses to start
    when two of its components are given one port)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class RayCluster:
    address: str  # the GCS address drivers connect to
    log: Path


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    with pytest.MonkeyPatch.context() as mp:
        # Token authentication on, with this cluster's own token (never the one in the
        # home folder), for the head and for this process, which connects as a driver.
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        # Ray reads the mode into its config when first imported, and caches the token:
        # refresh both from the environment just set (Ray's own tests do the same).
        from ray._private.authentication_test_utils import reset_auth_token_state
        reset_auth_token_state()
        try:
            yield from _head_node()
        finally:
            mp.undo()
            reset_auth_token_state()


def _head_node() -> Iterator[RayCluster]:
    # Ray's unix sockets live under the temp folder and their paths may not pass 107
    # characters: a short folder of our own, not pytest's deep tmp_path.
    temp = Path(tempfile.mkdtemp(prefix="ray"))
    env = {**os.environ,
           "RAY_USAGE_STATS_ENABLED": "0",
           # SIGTERM otherwise first waits for the node to drain (30 s by default).
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "OMP_NUM_THREADS": "1"}
    (port, dashboard, client_server, node_manager, object_manager, agent_http, agent_grpc,
     runtime_env, metrics) = free_ports(9)
    log_path = temp / "head.log"
    # The state API (actors' required resources) is served by the dashboard's HTTP
    # server: on, on a free local port. Every other port is free too, so this cluster
    # never meets another one on this machine.
    args = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--port", str(port),
            "--temp-dir", str(temp), "--num-cpus", "2", "--num-gpus", "2",
            "--object-store-memory", str(100 * 1024 * 1024),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard),
            "--ray-client-server-port", str(client_server),
            "--node-manager-port", str(node_manager),
            "--object-manager-port", str(object_manager),
            "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env),
            "--metrics-export-port", str(metrics),
            "--disable-usage-stats"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited with {proc.returncode}:\n"
                                     f"{log_path.read_text()}")
            return "Ray runtime started" in log_path.read_text()
        wait_for("the Ray head", started, 60)
        yield RayCluster(f"127.0.0.1:{port}", log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        shutil.rmtree(temp, ignore_errors=True)


def worker_logs(cluster: RayCluster, lines: int = 15) -> str:
    """The end of each actor process's stderr (the worker logs there), for a failure."""
    logs = sorted((cluster.log.parent / "session_latest" / "logs").glob("worker-*.err"))
    return "\n".join(f"{p.name}:\n" + "\n".join(p.read_text().splitlines()[-lines:])
                     for p in logs)


def test_worker_actors_register_leave_and_survive_a_restart(
        ray_cluster: RayCluster, model_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import ray
    from ray.util.state import list_actors

    from scheduler.autoscale.provisioners.ray_cluster import RayProvisioner

    worker_args = ["--model-dir", str(model_dir), "--output-dir", str(tmp_path / "out"),
                   "--intra-op-threads", "1", "--max-batch", "1", "--metrics-port", "0",
                   "--profile-render-sides", "256", "--profile-encode-sizes", "256x256",
                   "--profile-iterations", "1"]
    autoscaler = AutoscalerConfig(
        provisioner=ProvisionerKind.RAY, ray_address=ray_cluster.address,
        ray_namespace=NAMESPACE,
        pools={"gpu": PoolConfig(device_type="gpu", max_workers=2, ray_num_gpus=0.5,
                                 worker_args=worker_args)})

    async def main() -> None:
        running = await start(SchedulerConfig(
            listen="127.0.0.1:0", metrics_port=-1, database=tmp_path / "state.db",
            avatar_dir=model_dir / "avatars"))
        prov = RayProvisioner(autoscaler, f"127.0.0.1:{running.port}")
        try:
            await asyncio.to_thread(prov.scale, "gpu", 2)
            ids = [i.worker_id for i in await asyncio.to_thread(prov.instances, "gpu")]
            assert len(ids) == 2 and all(w.startswith("gpu-") for w in ids), ids

            async def registered(want: set[str], timeout: float) -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while set(running.core.workers) != want:
                    assert loop.time() < deadline, (
                        f"scheduler has {sorted(running.core.workers)}, want {sorted(want)}; "
                        f"Ray lists {await asyncio.to_thread(prov.instances, 'gpu')}\n"
                        f"{worker_logs(ray_cluster)}")
                    await asyncio.sleep(0.2)

            await registered(set(ids), 90)
            assert all(running.core.workers[w].device_type == "gpu" for w in ids)

            actors = await asyncio.to_thread(
                list_actors, address=ray_cluster.address, detail=True,
                filters=[("ray_namespace", "=", NAMESPACE), ("state", "=", "ALIVE")])
            assert sorted(str(a.name) for a in actors) == sorted(ids)
            for a in actors:
                assert a.required_resources == {"GPU": 0.5}, a.required_resources  # no CPU
            assert ray.available_resources().get("GPU") == 1.0

            leaving, staying = ids
            assert prov.removable("gpu", [leaving]) == [leaving]
            await asyncio.to_thread(prov.scale, "gpu", 1, [leaving])
            assert [i.worker_id for i in await asyncio.to_thread(prov.instances, "gpu")] == [staying]
            await registered({staying}, 30)
            # Stopped, not killed: the provisioner warns when a worker's own stop fails.
            assert not [r.getMessage() for r in caplog.records
                        if r.name == "scheduler.autoscale.provisioners.ray_cluster"
                        and r.levelno >= logging.WARNING]
        finally:
            await asyncio.to_thread(prov.close)
            await running.stop(grace=0.1)
        assert not ray.is_initialized()

        # A restarted scheduler: a new provisioner and connection find the actor by name.
        again = RayProvisioner(autoscaler, f"127.0.0.1:{running.port}")
        try:
            instances = await asyncio.to_thread(again.instances, "gpu")
            assert [i.worker_id for i in instances] == [staying]
            await asyncio.to_thread(again.scale, "gpu", 0, [staying])
            assert await asyncio.to_thread(again.instances, "gpu") == []
        finally:
            await asyncio.to_thread(again.close)

    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(main(), 150))
    assert time.monotonic() - t0 < 120
