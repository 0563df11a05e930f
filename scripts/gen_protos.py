#!/usr/bin/env python3
"""Regenerate the Python modules and type stubs of the contract in ``protos/``.

The generated ``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py`` and ``*_pb2_grpc.pyi`` files
sit beside their ``.proto`` files, so the proto package path is the Python import path.
They are never edited by hand: change the ``.proto`` and run this script.

``--check`` generates into a scratch directory and exits 1 if the committed files differ,
which is how the tests catch a stale contract.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def include_dirs() -> list[Path]:
    """Where protoc finds the contract and google/api/* (both in protos/, vendored) and
    google/protobuf/* (bundled with grpcio-tools' protoc, as with any protoc)."""
    import grpc_tools

    return [PROTO_ROOT, Path(grpc_tools.__file__).parent / "_proto"]


def _plugin(name: str) -> Path:
    """The mypy-protobuf plugins are console scripts installed beside this interpreter."""
    candidate = Path(sys.executable).parent / name
    found = candidate if candidate.exists() else shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: install the project's dev extras (pip install -e '.[dev]')")
    return Path(found)


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("venna/**/*.proto"))


def generate(out_dir: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        *(f"-I{path}" for path in include_dirs()),
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *(str(path.relative_to(PROTO_ROOT)) for path in proto_files()),
    ]
    # protoc resolves relative file names against the include path; run from the proto root.
    completed = subprocess.run(args, cwd=PROTO_ROOT, check=False)
    if completed.returncode != 0:
        sys.exit(f"protoc failed with exit code {completed.returncode}")


def generated_files(root: Path) -> set[Path]:
    return {
        path.relative_to(root) for path in root.glob("venna/**/*") if path.name.endswith(GENERATED_SUFFIXES)
    }


def check() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        generate(scratch_dir)
        expected = generated_files(scratch_dir)
        present = generated_files(PROTO_ROOT)
        stale = sorted(
            str(rel)
            for rel in expected | present
            if rel not in expected
            or rel not in present
            or not filecmp.cmp(scratch_dir / rel, PROTO_ROOT / rel, shallow=False)
        )
    if stale:
        print("generated code is stale; run scripts/gen_protos.py:", *stale, sep="\n  ")
        return 1
    print("generated code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    options = parser.parse_args()
    if options.check:
        return check()
    for rel in generated_files(PROTO_ROOT):
        (PROTO_ROOT / rel).unlink()
    generate(PROTO_ROOT)
    print(f"generated {len(generated_files(PROTO_ROOT))} files under {PROTO_ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
