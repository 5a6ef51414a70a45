"""`python -m bench [GROUP ...] [--only NAME ...]`: run benchmark groups against a real
PostgreSQL and real server processes, print a table, write bench/results/latest.json and
the report docs/bench/REPORT.md with its plots (`--report-only`: just the report, from the
results file).

A group is a module with `async def run(ctx: Context) -> dict[str, dict]` (benchmark name
-> result), registered in GROUPS. The exit code is 0 when every benchmark ran, whether or
not it met its goal (a miss is printed as MISSED); it is 1 when a benchmark broke.

PostgreSQL runs with its durable defaults (fsync and synchronous_commit on) for every
benchmark, restored before each one; every entry records the settings it ran with
(`postgres`), and the report and the README headline state them.

heartbeat_load and send_to_receipt also measure, in the same run, the same server
serving TLS (*_tls) and one that trusts every caller (*_plain, bench/plain_server.py, for
measurement only); *_auth_cost compares the three. `--only heartbeat_load` (or the name
of any of its entries) runs all of them.
"""

from __future__ import annotations

import os

# The benchmark starts processes while gRPC may be loaded; fork handlers only add noise.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import importlib
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from bench import common, report

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

# group name -> module (tasks, daemon: add theirs here)
GROUPS: dict[str, str] = {
    "liveness": "bench.liveness",
    "tasks": "bench.tasks",
    "daemon": "bench.daemon",
    "throughput": "bench.throughput",
}


async def _run(groups: list[str], only: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with common.environment() as ctx:
        ctx.only = only
        shown = await common.postgres_settings(ctx.admin_url)
        print(
            f"PostgreSQL: {common.describe_postgres(shown)}; data on {common.filesystem(ctx.tmp)}"
        )
        if not ctx.pg_stat_statements:
            print("note: pg_stat_statements unavailable; statement counts come from metrics")
        for group in groups:
            module = importlib.import_module(GROUPS[group])
            results.update(await module.run(ctx))
    return results


def _terminate(signum: int, _frame: Any) -> None:
    # Turn SIGTERM into an exception so every `finally` runs: children end, PostgreSQL stops.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("groups", nargs="*", help=f"of {', '.join(GROUPS)} (default: all)")
    p.add_argument("--only", action="append", default=[], help="run only this benchmark")
    p.add_argument(
        "--out", type=Path, default=common.RESULTS_DIR / "latest.json", help="results file"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite docs/bench/REPORT.md and its plots from the results file",
    )
    p.add_argument(
        "--report-dir",
        type=Path,
        help="report directory (default: docs/bench for the default results file, else "
        "a 'report' folder beside --out, so a trial run never rewrites the published report)",
    )
    args = p.parse_args(argv)
    if args.report_dir is None:
        default_out = common.RESULTS_DIR / "latest.json"
        args.report_dir = (
            report.DOCS_DIR
            if args.out.resolve() == default_out.resolve()
            else args.out.parent / "report"
        )
    if args.report_only:
        print(f"report: {report.write(args.out, args.report_dir)}")
        return 0
    groups = args.groups or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown group {', '.join(unknown)}; known: {', '.join(GROUPS)}")
    signal.signal(signal.SIGTERM, _terminate)
    # Thousands of connections (liveness_capacity): servers and generators inherit this.
    common.raise_nofile()
    started = time.monotonic()
    try:
        results = asyncio.run(_run(groups, set(args.only)))
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    common.print_table(results)
    common.write_results(results, args.out)
    print(f"report: {report.write(args.out, args.report_dir)}")
    broken = [name for name, r in results.items() if "error" in r]
    missed = [name for name, r in results.items() if "error" not in r and not r.get("pass")]
    print(f"total {time.monotonic() - started:.0f} s; results in {args.out}")
    if missed:
        print(f"MISSED: {', '.join(missed)}")
    if broken:
        print(f"BROKEN: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
