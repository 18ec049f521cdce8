"""The dependency locks and the generated code: the locks satisfy pyproject.toml, the
environment the tests run in is the lock, and the committed gRPC code is what the
locked generator makes from proto/."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"dev.txt": ["dev", "ray", "kubernetes"], "image.txt": ["ray", "kubernetes"],
         "image-gpu.txt": ["gpu", "ray", "kubernetes"]}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*(.+?))?\s*\\?$")


def pins(lock: str, environment: dict[str, str] | None = None) -> dict[str, Version]:
    """name -> pinned version of the lines of `lock` whose markers hold in `environment`
    (the running interpreter by default)."""
    out: dict[str, Version] = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        m = _PIN.match(line)
        if m is None:
            continue
        name, version, marker = m.groups()
        if marker is None or Marker(marker).evaluate(environment):
            out[canonicalize_name(name)] = Version(version)
    return out


def requirements(extras: list[str]) -> list[Requirement]:
    """pyproject.toml's requirements of the base set and `extras`, self-references expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    out, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            r = Requirement(text)
            if canonicalize_name(r.name) == "avatarfarm":
                todo.extend(r.extras)
            else:
                out.append(r)
    return out


@pytest.mark.parametrize("lock", sorted(LOCKS))
@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_each_lock_satisfies_pyproject(lock: str, python: str) -> None:
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    pinned = pins(lock, env)
    for r in requirements(LOCKS[lock]):
        name = canonicalize_name(r.name)
        if lock == "image-gpu.txt" and name == "onnxruntime":
            assert name not in pinned, "the GPU image must not hold onnxruntime beside onnxruntime-gpu"
            continue
        assert name in pinned, f"{r} is not in requirements/{lock}: run `make lock`"
        assert r.specifier.contains(pinned[name], prereleases=True), \
            f"requirements/{lock} pins {name}=={pinned[name]} outside {r}: run `make lock`"


def test_the_environment_is_the_lock() -> None:
    """`make test` installs requirements/dev.txt exactly; a package at another version
    means the environment did not come from the lock, and results may not hold on a fresh
    machine."""
    wrong = []
    for name, version in pins("dev.txt").items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing (lock: {version})")
            continue
        if installed != version:
            wrong.append(f"{name} {installed} (lock: {version})")
    assert not wrong, "not the locked environment (run `make test`, which installs it): " + ", ".join(wrong)


def test_generated_protobuf_code_is_current(tmp_path: Path) -> None:
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    locked = pins("dev.txt")[canonicalize_name("grpcio-tools")]
    installed = Version(metadata.version("grpcio-tools"))
    assert installed == locked, (f"grpcio-tools {installed} is installed but the lock pins {locked}: "
                                 "the generated code is checked with the locked generator (run `make test`)")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    rc = grpc_tools.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
                          f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                          f"--grpc_python_out={tmp_path}", *protos])
    assert rc == 0
    for generated in sorted((tmp_path / "avatarfarm" / "v1").iterdir()):
        committed = ROOT / "avatarfarm" / "v1" / generated.name
        assert committed.exists(), f"{committed.name} is not committed: run `make proto`"
        assert committed.read_text() == generated.read_text(), f"{committed.name} is stale: run `make proto`"
