"""The layering rules that can be checked by reading the code (DESIGN.md "Layers")."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "payment_grpc"
TRANSPORT_MODULES = ("grpc", "grpc_status", "google.rpc", "google.protobuf", "payments", "orders")


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _is_transport(module: str) -> bool:
    return any(module == t or module.startswith(f"{t}.") for t in TRANSPORT_MODULES)


@pytest.mark.parametrize(
    "path",
    _modules("domain") + _modules("service"),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_domain_and_service_import_no_grpc_or_protobuf(path: Path) -> None:
    assert not {m for m in _imports(path) if _is_transport(m)}


def test_domain_imports_only_the_standard_library_and_itself() -> None:
    for path in _modules("domain"):
        third_party = {
            m.split(".")[0]
            for m in _imports(path)
            if not m.startswith("payment_grpc.domain")
            and m.split(".")[0] not in sys.stdlib_module_names
        }
        assert not third_party, path


@pytest.mark.parametrize("path", _modules("service"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_service_names_no_rpc_path(path: Path) -> None:
    # Keys record an Operation, not the RPC that ran it: no transport paths in service/.
    assert "/payments.v1." not in path.read_text()
