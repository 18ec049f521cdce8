"""Shared fixtures: the reference model folder is built once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm import postgres
from workers.device.onnx import ProviderChoice
from workers.device.pipeline import Pipeline
from workers.models.folder import ModelFolder, build_reference


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_reference(root, "lite", wav2lip="tiny")
    return root


@pytest.fixture(scope="session")
def folder(model_dir: Path) -> ModelFolder:
    return ModelFolder.open(model_dir)


@pytest.fixture(scope="session")
def pipeline(folder: ModelFolder) -> Pipeline:
    p = Pipeline(folder, ProviderChoice.CPU, intra_op_threads=2)
    yield p  # type: ignore[misc]
    p.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """A real PostgreSQL server for the session (skipped where none can start, unless
    AVATARFARM_REQUIRE_POSTGRES=1 says it must)."""
    why = postgres.available()
    if why is not None:
        if os.environ.get("AVATARFARM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (AVATARFARM_REQUIRE_POSTGRES=1): {why}")
        pytest.skip(why)
    server = postgres.PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: postgres.PostgresServer) -> str:
    """The URI of a new, empty database of this test's own."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """SchedulerConfig fields selecting each store in turn: the SQLite file, then a
    PostgreSQL database (whose schedulers share a live-input secret file)."""
    if request.param == "sqlite":
        return {"database": tmp_path / "state.db"}
    return {"database": tmp_path / "unused.db", "database_url": request.getfixturevalue("postgres_url"),
            "input_secret_file": tmp_path / "input-secret"}
