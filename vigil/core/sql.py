"""Named SQL queries loaded once from a service's `queries.sql`.

A query starts with `-- name: NAME`; the comment lines after it say what it does and
name its `$n` parameters.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def load_queries(path: Path) -> dict[str, str]:
    text = path.read_text()
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = "\n".join(line for line in body.splitlines() if not line.strip().startswith("--"))
        if name in queries:
            raise ValueError(f"{path}: query {name!r} defined twice")
        queries[name] = sql.strip().rstrip(";")
    return queries
