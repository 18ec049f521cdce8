"""The command line and configuration: help that explains, precedence of
flags over environment over file, and the shipped configs load."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from avatarfarm import config as cfg
from farm.cli import build_parser, main
from scheduler.config import SchedulerConfig
from workers.config import WorkerConfig
from workers.device.onnx import ProviderChoice
from workers.rooms.room import Pacing

ROOT = Path(__file__).resolve().parents[1]


def parse(cls: type, argv: list[str], env: dict[str, str] | None = None, prefix: str = "X_"):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    cfg.add_arguments(p, cls)
    return cfg.load(cls, args=p.parse_args(argv), env_prefix=prefix, env=env or {})


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    f = tmp_path / "w.toml"
    f.write_text('pacing = "fast"\nlatency_budget = 0.2\nintra_op_threads = 3\n')
    conf = parse(WorkerConfig, ["--config", str(f), "--intra-op-threads", "1"],
                 env={"X_LATENCY_BUDGET": "0.3"})
    assert conf.pacing is Pacing.FAST  # from the file
    assert conf.latency_budget == 0.3  # environment over file
    assert conf.intra_op_threads == 1  # flag over both


def test_bad_values_and_unknown_options_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="provider"):
        parse(WorkerConfig, ["--provider", "quantum"])
    with pytest.raises(ValueError, match="latency_budget"):
        parse(WorkerConfig, ["--latency-budget", "soon"])
    f = tmp_path / "bad.toml"
    f.write_text("colour = 'blue'\n")
    with pytest.raises(ValueError, match="unknown option"):
        parse(SchedulerConfig, ["--config", str(f)])
    f.write_text("[tenants.x]\nreserved = 3\n")
    with pytest.raises(ValueError, match="tenants: unknown option"):
        parse(SchedulerConfig, ["--config", str(f)])
    f.write_text("[tenants.x]\non_budget_exhausted = 'panic'\n")
    with pytest.raises(ValueError, match="panic"):
        parse(SchedulerConfig, ["--config", str(f)])
    f.write_text("[tenants.x]\nreserved_units = 4.0\nreserved_hours = ['7pm-11pm']\n")
    with pytest.raises(ValueError, match="'7pm-11pm' is not HH:MM-HH:MM"):
        parse(SchedulerConfig, ["--config", str(f)])
    f.write_text("[tenants.x]\nreserved_units = 4.0\nreserved_hours = ['19:00-23:30']\n"
                 "timezone = 'Asia/Shanghai'\n")
    t = parse(SchedulerConfig, ["--config", str(f)]).tenants["x"]
    assert t.reserved_at(12 * 3600.0) == 4.0 and t.reserved_at(16 * 3600.0) == 0.0  # UTC+8


def test_shipped_configs_load() -> None:
    s = parse(SchedulerConfig, ["--config", str(ROOT / "deploy/local/scheduler.toml")])
    assert s.price("h200") == 5.0 and s.price("tpu") == s.default_price_per_hour
    brand = s.tenants["example-brand"]
    assert brand.reserved_units == 8.0 and brand.on_budget_exhausted.value == "degrade"
    assert s.degradation_ladder == ["1.0@25", "0.75@25", "0.5@25"]
    w = parse(WorkerConfig, ["--config", str(ROOT / "deploy/local/worker.toml")])
    assert w.provider is ProviderChoice.AUTO and w.encode_sizes() == [(512, 512), (1280, 720)]


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in ("demo", "scheduler", "worker", "build-models"):
        assert command in text
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    out = capsys.readouterr().out
    assert "--provider" in out and "onnxruntime provider" in out and "AVATARFARM_WORKER_" in out


def test_a_worker_without_models_says_how_to_build_them(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "farm.cli", "worker", "--model-dir",
                        str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "avatarfarm build-models" in r.stderr
