"""onnxruntime behind one small wrapper: provider choice, thread sizing, and the
provider actually obtained.

On a machine without a GPU, onnxruntime-gpu still lists CUDA among the
available providers and silently falls back to CPU, so the provider in use is
read from the created session, never from the availability list.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)


class ProviderChoice(enum.Enum):
    AUTO = "auto"  # CUDA (TensorRT first where present) if a GPU serves it, else CPU
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


_PROVIDER_CHAINS: dict[ProviderChoice, list[str]] = {
    ProviderChoice.CPU: ["CPUExecutionProvider"],
    ProviderChoice.CUDA: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    ProviderChoice.TENSORRT: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                              "CPUExecutionProvider"],
    ProviderChoice.AUTO: ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def auto_intra_op_threads(cores: int | None = None) -> int:
    """Threads per inference call when not configured: all cores but a quarter (at least
    one), which stay free for encoders, audio and the event loop. On a 2-core machine
    inference gets one core: two would starve every room's encoder."""
    n = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, n - max(1, n // 4))


class ModelInterfaceError(ValueError):
    """A model whose inputs or outputs do not match the interface the pipeline needs."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    rank: int


@dataclass(frozen=True, slots=True)
class ModelInterface:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class OrtModel:
    """One onnxruntime session, checked against an interface (by tensor names), timed
    per call."""

    def __init__(self, name: str, path: Path, interface: ModelInterface | None,
                 provider: ProviderChoice = ProviderChoice.AUTO, intra_op_threads: int = 0) -> None:
        self.name = name
        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or auto_intra_op_threads()
        opts.inter_op_num_threads = 1
        # Idle inference threads must sleep, not spin: encoders share these cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        wanted = [p for p in _PROVIDER_CHAINS[provider] if p in available]
        if provider in (ProviderChoice.CUDA, ProviderChoice.TENSORRT) and wanted == ["CPUExecutionProvider"]:
            log.warning("%s requested but this onnxruntime build has no GPU providers; using CPU",
                        provider.value)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        except Exception as e:
            raise ModelInterfaceError(f"cannot load model {name} from {path}: {e}") from e
        self.provider: str = self.session.get_providers()[0]
        if interface is not None:  # None: the caller binds the model by shape and role
            self._check(interface)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # On a GPU, outputs are bound to device memory and copied back once per call
        # (IO binding), rather than onnxruntime allocating host buffers per run.
        self._io_binding = self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    def input_shape(self, name: str) -> list[int | str | None]:
        for i in self.session.get_inputs():
            if i.name == name:
                return list(i.shape)
        raise KeyError(name)

    def output_shape(self, name: str) -> list[int | str | None]:
        for o in self.session.get_outputs():
            if o.name == name:
                return list(o.shape)
        raise KeyError(name)

    def _check(self, interface: ModelInterface) -> None:
        got_in = {i.name: len(i.shape) for i in self.session.get_inputs()}
        got_out = {o.name: len(o.shape) for o in self.session.get_outputs()}
        for want, got, kind in ((interface.inputs, got_in, "input"), (interface.outputs, got_out, "output")):
            for spec in want:
                if spec.name not in got:
                    raise ModelInterfaceError(
                        f"model {self.name} ({self.path}) has no {kind} named {spec.name!r}; "
                        f"it has {sorted(got)}")
                if got[spec.name] != spec.rank:
                    raise ModelInterfaceError(
                        f"model {self.name} {kind} {spec.name!r} has rank {got[spec.name]}, "
                        f"expected {spec.rank}")

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[Any], float]:
        """Runs the model; returns its outputs and the call's wall time in seconds."""
        t0 = time.perf_counter()
        if self._io_binding:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            out: list[Any] = binding.copy_outputs_to_cpu()
        else:
            out = self.session.run(None, feeds)
        return out, time.perf_counter() - t0
