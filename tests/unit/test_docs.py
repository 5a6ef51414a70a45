"""The docs match the code: docs/architecture.md names every table and every RPC, and
the README and docs link only to files of this repository that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vigil.v1 import liveness_pb2, machines_pb2, tasks_pb2, tokens_pb2

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _rpcs() -> list[str]:
    found = []
    for module in (liveness_pb2, tasks_pb2, machines_pb2, tokens_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            found += [m.name for m in service.methods]
    return found


def _tables() -> list[str]:
    names = []
    for path in [*ROOT.glob("*/migrations/*.sql"), *ROOT.glob("vigil/core/*/migrations/*.sql")]:
        names += re.findall(r"CREATE TABLE (\w+\.\w+)", path.read_text())
    return names


@pytest.mark.parametrize("rpc", _rpcs())
def test_every_rpc_is_in_the_architecture(rpc: str) -> None:
    assert f"`{rpc}`" in ARCHITECTURE


@pytest.mark.parametrize("table", _tables())
def test_every_table_is_in_the_architecture(table: str) -> None:
    assert f"`{table}`" in ARCHITECTURE


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_stay_inside_the_repository(doc: Path) -> None:
    for target in _LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"
