"""Headless chromium for the tests that need a real browser (the status page, a camera
driver's preview): found on the machine, or the test is skipped (failed where CI says
it must run)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path is not None:
            return path
    if os.environ.get("AVATARFARM_REQUIRE_CHROMIUM") == "1":
        pytest.fail("chromium is required here (AVATARFARM_REQUIRE_CHROMIUM=1) and not installed")
    pytest.skip("chromium is not installed")


async def start_chromium(binary: str, url: str, workdir: Path, *args: str) -> asyncio.subprocess.Process:
    """Headless chromium on ``url`` in a profile of its own, its output piped."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
    # No sandbox: it needs privileges containers and root lack, and the browser only
    # loads this test's own pages from the local host.
    return await asyncio.create_subprocess_exec(
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--hide-scrollbars", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1280,900", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(profile), "XDG_CONFIG_HOME": str(profile),
             "XDG_CACHE_HOME": str(profile)})
