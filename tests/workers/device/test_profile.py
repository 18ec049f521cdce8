"""Start-up profiling: every frame size a room may ask for is measured, whatever the
renderer's sides, and sizes that cannot be are refused with a message saying what to change."""

from __future__ import annotations

import argparse

import pytest

from avatarfarm import config as cfg
from avatarfarm.domain import Stage
from workers.config import WorkerConfig
from workers.device.pipeline import Pipeline
from workers.device.profile import measure


def test_encode_sizes_smaller_than_the_render_side_profile(pipeline: Pipeline) -> None:
    # The demo's phone format and a small square, below the largest render side: a room of
    # that size renders its portrait at min(width, height), and so does the profile.
    sizes = [(432, 768), (256, 256), (640, 360)]
    profiles = measure(pipeline, [512], sizes, iterations=1, max_batch=1)
    encode = {(p.width, p.height): p for p in profiles if p.stage is Stage.ENCODE}
    assert sorted(encode) == sorted(sizes)
    assert all(p.latencies[0][1] > 0 for p in encode.values())


def load(argv: list[str]) -> WorkerConfig:
    p = argparse.ArgumentParser()
    cfg.add_arguments(p, WorkerConfig)
    return cfg.load(WorkerConfig, args=p.parse_args(argv), env={})


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--profile-encode-sizes", "432by768", "profile_encode_sizes: '432by768' is not WIDTHxHEIGHT"),
    ("--profile-encode-sizes", "0x720", "between 16 and 3840"),
    ("--profile-encode-sizes", "512x99999", "between 16 and 3840"),
    ("--profile-render-sides", "256,big", "profile_render_sides: 'big' is not a side"),
    ("--profile-render-sides", "8", "between 16 and 3840"),
    ("--profile-render-sides", "256x256", "is not a side"),
    ("--profile-render-sides", "", "at least one"),
    ("--encoder-processes", "-2", "encoder_processes: -2 is not -1, 0 or a number of processes"),
])
def test_unusable_profile_sizes_are_refused_with_what_to_change(flag: str, value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        load([flag, value])


def test_profile_sizes_parse() -> None:
    conf = load(["--profile-render-sides", "256, 512", "--profile-encode-sizes", "432x768,720"])
    assert conf.render_sides() == [256, 512]
    assert conf.encode_sizes() == [(432, 768), (720, 720)]
