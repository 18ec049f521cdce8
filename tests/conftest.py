"""Shared fixtures: the reference model folder is built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

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
