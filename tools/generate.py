"""Regenerate everything derived from protos/: python stubs, .pyi, descriptor sets.

Run as `python tools/generate.py` (or `make generate`). Deterministic: running it twice
gives the same bytes, so CI can fail when generated/ is stale.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import shutil
import subprocess
import sys

import google.api.annotations_pb2
from google.protobuf import (
    descriptor_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "generated"
THIRD_PARTY = ROOT / "third_party"
VALIDATE_SET = THIRD_PARTY / "buf_validate.binpb"
GOOGLEAPIS = pathlib.Path(google.api.annotations_pb2.__file__).parents[2]
GOOGLE_PROTOS = ["google/api/annotations.proto", "google/api/http.proto"]


def embedded_validate_descriptor() -> bytes:
    """The serialized buf/validate/validate.proto that the protovalidate wheel embeds."""
    from protovalidate._gen.buf.validate import validate_pb

    tree = ast.parse(inspect.getsource(validate_pb))
    for node in ast.walk(tree):
        value = node.value if isinstance(node, ast.Constant) else None
        if isinstance(value, bytes) and value.startswith(b"\n\x1bbuf/validate/validate.proto"):
            return value
    raise SystemExit("buf/validate/validate.proto not found in the protovalidate wheel")


def write_validate_descriptor_set() -> None:
    files = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        files.file.add().MergeFromString(module.DESCRIPTOR.serialized_pb)
    files.file.add().MergeFromString(embedded_validate_descriptor())
    THIRD_PARTY.mkdir(exist_ok=True)
    VALIDATE_SET.write_bytes(files.SerializeToString(deterministic=True))


def copy_google_api_protos() -> None:
    for name in GOOGLE_PROTOS:
        target = THIRD_PARTY / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GOOGLEAPIS / name, target)


def protoc(*args: str) -> None:
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"-I{GOOGLEAPIS}", *args]
    subprocess.run(command, check=True, cwd=ROOT)


def our_protos() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def add_package_markers() -> None:
    for directory in sorted({p.parent for p in OUT.rglob("*_pb2.py")}):
        while directory != OUT:
            (directory / "__init__.py").touch()
            directory = directory.parent
    (OUT / "py.typed").touch()


def main() -> None:
    write_validate_descriptor_set()
    copy_google_api_protos()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    validate_in = f"--descriptor_set_in={VALIDATE_SET}"
    protoc(validate_in, f"--python_out={OUT}", f"--mypy_out={OUT}", "buf/validate/validate.proto")
    protos = our_protos()
    protoc(
        validate_in,
        f"--python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    )
    protoc(
        validate_in,
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={OUT / 'payments_descriptor_set.binpb'}",
        *protos,
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    )
    add_package_markers()


if __name__ == "__main__":
    main()
