"""The contract compiles from a clone with nothing else: the google/api files it imports are
vendored in protos/ (with their provenance and licence), protoc needs only its own bundled
google/protobuf files, buf works from the repository root, and every file names its packages
for Go and Java."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
CONTRACT = sorted(path.relative_to(PROTOS) for path in PROTOS.glob("venna/**/*.proto"))


def test_protoc_compiles_the_contract_from_protos_alone(tmp_path: Path) -> None:
    """Only protos/ and protoc's own google/protobuf include: no googleapis package, no network."""
    image = tmp_path / "contract.binpb"
    compiled = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            "--include_imports",
            f"--descriptor_set_out={image}",
            *map(str, CONTRACT),
        ],
        cwd=PROTOS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert compiled.returncode == 0, compiled.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file
    names = {file.name for file in files}
    assert {"google/api/annotations.proto", "google/api/http.proto"} <= names
    for file in files:
        if file.name.startswith("venna/"):
            assert file.options.go_package.startswith("venna.dev/gen/go/venna/responses/v1"), file.name
            assert file.options.java_package == "dev.venna.responses.v1", file.name
            assert file.options.java_multiple_files, file.name


def test_the_vendored_files_carry_their_provenance_and_licence() -> None:
    vendored = PROTOS / "google" / "api"
    assert (vendored / "LICENSE").read_text().lstrip().startswith("Apache License")
    source = (vendored / "SOURCE.md").read_text()
    assert "googleapis/googleapis" in source and "Apache License 2.0" in source


def test_buf_builds_and_lints_from_the_repository_root() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.fail("buf is a dev dependency and must be installed")
    for command in ("build", "lint"):
        ran = subprocess.run([buf, command], cwd=ROOT, capture_output=True, text=True, check=False)
        assert ran.returncode == 0, f"buf {command}: {ran.stdout}{ran.stderr}"
