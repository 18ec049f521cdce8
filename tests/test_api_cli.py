"""The real command line against a real farm (scheduler and worker processes): a tenant
creates, lists, watches, feeds and ends rooms and reads usage and budgets; an operator
lists workers and drains one; refusals exit with the gRPC status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.local import LocalFarm
from scheduler.api import auth
from tests.test_failover import free_port

pytestmark = pytest.mark.slow
KEY = b"cli-test-signing-key-0123456789abcdef"


def mint(kind: auth.SubjectKind, name: str) -> str:
    return auth.mint_token(KEY, kind, name, ttl_seconds=3600, now=time.time())


def cli(farm: LocalFarm, *args: str, token: str = "", config: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVATARFARM_")}
    env["HOME"] = str(farm.home)  # no config file of the user's in the way
    if config is not None:
        env["AVATARFARM_CONFIG"] = str(config)
    if token:
        env["AVATARFARM_TOKEN"] = token
    if config is None:
        env["AVATARFARM_SCHEDULER"] = farm.address
    out = subprocess.run([sys.executable, "-m", "farm.cli", *args], capture_output=True, text=True,
                         env=env, timeout=120)
    if check:
        assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out


def test_tenants_and_operators_drive_the_farm_from_the_shell(tmp_path: Path, model_dir: Path) -> None:
    home = tmp_path / "farm"
    home.mkdir()
    (home / "models").symlink_to(model_dir)
    secret = tmp_path / "token.key"
    secret.write_bytes(KEY)
    worker_token = tmp_path / "worker.token"
    worker_token.write_text(mint(auth.SubjectKind.WORKER, "worker-0"))
    farm = LocalFarm(home, workers=1, pacing="realtime", worker_threads=1, overcommit=4.0,
                     scheduler_port=free_port(),
                     scheduler_args=["--token-secret-file", str(secret)],
                     worker_args=["--token-file", str(worker_token), "--profile-render-sides", "128",
                                  "--profile-encode-sizes", "128x128", "--profile-iterations", "1"])
    brand, rival, ops = (mint(auth.SubjectKind.TENANT, "brand"), mint(auth.SubjectKind.TENANT, "rival"),
                         mint(auth.SubjectKind.ADMIN, "ops"))
    spec = tmp_path / "show.toml"
    spec.write_text('tenant = "brand"\nroom = "launch"\nsize = "128x128"\nfps = 25\n'
                    'file = "launch.mp4"\nscript = ["Welcome to the launch.", '
                    '{text = "Three offers tonight.", pause = 0.5}]\n')
    with farm:
        # From a spec file, the flags overriding it; JSON out.
        made = json.loads(cli(farm, "rooms", "create", "--spec", str(spec), "--seconds", "10",
                              "--json", token=brand).stdout)
        sid = made["session_id"]
        assert made["spec"]["room_id"] == "launch" and made["spec"]["max_duration_seconds"] == 10
        # Lines appended while it speaks.
        appended = cli(farm, "rooms", "append", sid, "--text", "One more thing.", token=brand)
        assert "queued" in appended.stdout
        budget = cli(farm, "tenant", token=brand).stdout  # while it has a room
        assert budget.splitlines()[0].split()[:2] == ["TENANT", "UNITS"] and "brand" in budget
        # A table by default, with the room in it; a rival tenant sees nothing of it.
        listed = cli(farm, "rooms", "list", token=brand).stdout
        assert listed.splitlines()[0].split()[:3] == ["SESSION", "TENANT", "ROOM"]
        assert sid in listed and "launch" in listed
        assert sid not in cli(farm, "rooms", "list", token=rival).stdout
        refused = cli(farm, "rooms", "get", sid, token=rival, check=False)
        assert refused.returncode == 5 and "NOT_FOUND" in refused.stderr  # grpc.StatusCode.NOT_FOUND
        refused = cli(farm, "rooms", "create", "--tenant", "brand", "--room", "x", "--file", "x.mp4",
                      token=rival, check=False)
        assert refused.returncode == 7 and "PERMISSION_DENIED" in refused.stderr
        bad = cli(farm, "rooms", "create", "--tenant", "brand", "--room", "x", token=brand, check=False)
        assert bad.returncode == 2 and "exactly one output" in bad.stderr
        # Watched to its end.
        watched = cli(farm, "rooms", "watch", sid, "--json", token=brand).stdout.splitlines()
        states = [json.loads(line)["session"]["state"] for line in watched]
        assert states[-1] == "SESSION_STATE_ENDED"
        got = json.loads(cli(farm, "rooms", "get", sid, "--json", token=brand).stdout)
        assert got["progress"]["stream_seconds"] == pytest.approx(10.0)
        assert farm.output_of("brand", "launch.mp4").exists()
        # Usage and budgets.
        usage = cli(farm, "usage", "--by", "tenant,tier", token=brand).stdout
        assert usage.splitlines()[0].split()[:3] == ["TENANT", "TIER", "SESSIONS"]
        assert "brand" in usage and "standard" in usage
        rival_usage = cli(farm, "usage", "--tenant", "brand", token=rival, check=False)
        assert rival_usage.returncode == 7
        # A room until ended, ended from the shell, with the settings from a config file.
        config = tmp_path / "client.toml"
        token_file = tmp_path / "brand.token"
        token_file.write_text(brand)
        config.write_text(f'scheduler = "{farm.address}"\ntoken_file = "{token_file}"\n')
        long = json.loads(cli(farm, "rooms", "create", "--tenant", "brand", "--room", "open-ended",
                              "--size", "128x128", "--hls", "open", "--json", config=config).stdout)
        ended = cli(farm, "rooms", "end", long["session_id"], "--reason", "done", config=config)
        assert "ended" in ended.stdout
        # Operators: workers with their load, a drain by hand, pools; tenants may not.
        workers = cli(farm, "workers", "list", token=ops).stdout
        assert "worker-0" in workers and "accepting" in workers
        assert cli(farm, "workers", "list", token=brand, check=False).returncode == 7
        drained = json.loads(cli(farm, "workers", "drain", "worker-0", "--deadline", "30",
                                 "--reason", "kernel update", "--json", token=ops).stdout)
        assert drained["draining"] and drained["drain_reason"] == "kernel update"
        assert "draining" in cli(farm, "workers", "list", token=ops).stdout
        missing = cli(farm, "workers", "drain", "no-such-worker", token=ops, check=False)
        assert missing.returncode == 5
        assert "no autoscaler" in cli(farm, "pools", token=ops).stdout
