#!/usr/bin/env python3
"""Run ``buf lint`` on the contract in ``protos/``.

buf cannot resolve ``google/api/annotations.proto`` offline from a plain module, so the
script builds a descriptor image with grpcio-tools (which finds the google protos on the
include path) and lints only the ``venna/`` files of that image with ``buf.yaml``'s rules.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_protos import PROTO_ROOT, ROOT, include_dirs, proto_files


def main() -> int:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        sys.exit("buf not found: install the project's dev extras (pip install -e '.[dev]')")
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "image.binpb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                *(f"-I{path}" for path in include_dirs()),
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={image}",
                *(str(path.relative_to(PROTO_ROOT)) for path in proto_files()),
            ],
            cwd=PROTO_ROOT,
            check=True,
        )
        lint = subprocess.run(
            [buf, "lint", f"{image}#format=binpb", "--path", "venna", "--config", str(ROOT / "buf.yaml")],
            check=False,
        )
    if lint.returncode == 0:
        print("buf lint: clean")
    return lint.returncode


if __name__ == "__main__":
    sys.exit(main())
