"""The benchmark report: docs/bench/REPORT.md and its plots (PNG), written from a results
file (bench/results/latest.json).

    python -m bench --report-only      # regenerate from the last results
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import DURABLE, SHOWN_SETTINGS, is_durable
from vigil import testing as harness

DURABLE_KEYS = tuple(DURABLE)

DOCS_DIR = harness.ROOT / "docs" / "bench"
README = harness.ROOT / "README.md"
README_START = "<!-- bench:headline (written by python -m bench; do not edit) -->"
README_END = "<!-- /bench:headline -->"
REPORT = "REPORT.md"
CAPACITY_PNG = "liveness_capacity.png"

# The order of the report's table; benchmarks not listed follow in the file's order.
ORDER = (
    "kill_to_offline",
    "heartbeat_load",
    "heartbeat_load_plain",
    "heartbeat_load_tls",
    "heartbeat_load_auth_cost",
    "liveness_capacity",
    "send_to_receipt",
    "send_to_receipt_plain",
    "send_to_receipt_tls",
    "send_to_receipt_auth_cost",
    "kill_to_recorded",
    "deadline_lag",
    "scheduler_pass_flat",
    "tasks_lifecycle_rate",
)
# Latency distributions plotted (when the results hold their samples).
LATENCY_PLOTS = {
    "kill_to_offline": "SIGKILL of a session holder → server records it offline",
    "heartbeat_load": "heartbeat ack, 1,000 participants on one server",
    "send_to_receipt": "SendMessage → the waiting agent holds the task",
    "kill_to_recorded": "SIGKILL of a daemon's agent → exit recorded by the server",
    "deadline_lag": "task deadline → its notification created (10,000 deadlines)",
    "tasks_lifecycle_rate": "one full task lifecycle through gRPC (32 concurrent roles)",
    "liveness_capacity": "heartbeat ack at the most agents one replica sustained (30 s beats)",
}
# The comparisons of a benchmark's server variants (plain, auth, auth+TLS): the cost
# entry -> (the benchmark, what it measures, its entries by variant label).
AUTH_COSTS = {
    "heartbeat_load_auth_cost": (
        "heartbeat_load",
        "heartbeat ack at 1,000 participants",
        {
            "plain": "heartbeat_load_plain",
            "auth": "heartbeat_load",
            "auth+TLS": "heartbeat_load_tls",
        },
    ),
    "send_to_receipt_auth_cost": (
        "send_to_receipt",
        "send → receipt",
        {
            "plain": "send_to_receipt_plain",
            "auth": "send_to_receipt",
            "auth+TLS": "send_to_receipt_tls",
        },
    ),
}
AUTH_COST_METHOD = [
    "Three servers, measured in the same run: **plain**, `bench/plain_server.py` (the same "
    "`vigil.server.running()` with an authenticator that trusts every caller and looks "
    "nothing up: no token parsed, hashed, cached or read, no stream watched for revocation; "
    "for measurement only, never shipped); **auth**, the real `vigil` server, plaintext on "
    "loopback (the figures quoted without a variant); **auth+TLS**, the real server with "
    "`--tls-cert`/`--tls-key` (a development CA, ECDSA P-256, server authentication only) "
    "and every client verifying it with `VIGIL_TLS_CA`. The clients send the same bearer "
    "tokens to all three (the plain server ignores them).",
    "",
    "- **heartbeat ack:** 1,000 participants, each with a chatroom token of its own role, "
    "heartbeating every second from two load-generator processes. The variants take turns "
    "in rounds of 15 s, each on a fresh server and database, in the order plain, auth, "
    "auth+TLS, then auth+TLS, auth, plain (so a drift in the machine's other work weighs on "
    "each alike); each variant's median and p99 are over its ~30,000 acks of both rounds.",
    "- **send → receipt:** the three servers (`vigil up`, each with its own database and "
    "its own waiting agent holding a chatroom token of its role) run side by side and take "
    "turns task by task, rotating which goes first; 200 measured tasks each after 10 "
    "warm-up tasks.",
    "",
    "Added % = (variant median - plain median) / plain median. The machine has 2 shared, "
    "noisy cores: the per-round (heartbeat) and per-half (send → receipt) figures in the "
    "notes show how far the same comparison moves from one stretch to the next; a "
    "difference smaller than that spread is within the noise, whichever way it points.",
]


def _benchmarks(doc: Mapping[str, Any]) -> list[str]:
    names = [n for n in doc if n != "machine" and isinstance(doc[n], dict)]
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def fmt_ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        return f"{value:.1f}" if value >= 100 else f"{value:.2f}"
    return str(value)


def verdict(r: Mapping[str, Any]) -> str:
    if "error" in r:
        return "BROKEN"
    return "pass" if r.get("pass") else "**MISSED**"


def machine_line(m: Mapping[str, Any]) -> str:
    mem = f", {m['memory_gib']} GiB RAM" if m.get("memory_gib") else ""
    return (
        f"{m.get('cores')} cores ({m.get('cpu_model', 'unknown CPU')}){mem}, "
        f"Python {m.get('python')}, {m.get('platform')}"
    )


def _latency_goal(r: Mapping[str, Any]) -> str:
    """The latency part of a goal ("median ≤ 20 ms, p99 ≤ 100 ms"), without the checks."""
    return str(r.get("goal", "")).split(";")[0]


def postgres_of(r: Mapping[str, Any]) -> dict[str, Any] | None:
    """The PostgreSQL settings an entry ran with (None: not recorded, an older run)."""
    settings = r.get("postgres") or r.get("durability")
    return dict(settings) if isinstance(settings, Mapping) else None


def durable(r: Mapping[str, Any]) -> bool:
    return is_durable(postgres_of(r))


def pg_label(r: Mapping[str, Any], short: bool = False) -> str:
    """'' for an entry measured durable; else a label saying how it ran."""
    if durable(r):
        return ""
    if short:
        return " (NOT DURABLE)"
    settings = postgres_of(r)
    if settings is None:
        return " [NOT DURABLE: fsync and synchronous_commit off (an older run)]"
    mode = ", ".join(f"{k} {settings.get(k)}" for k in DURABLE_KEYS)
    return f" [NOT DURABLE: {mode}]"


def settings_line(doc: Mapping[str, Any], names: list[str]) -> str:
    """How PostgreSQL ran for these entries, in one sentence."""
    entries = [doc[n] for n in names if n in doc and "error" not in doc[n]]
    sample = next((postgres_of(r) for r in entries if durable(r)), None)
    shown = (
        ", ".join(f"{k} {v}" for k, v in sample.items() if k in SHOWN_SETTINGS)
        if sample
        else "fsync on, synchronous_commit on"
    )
    disk = (
        f", data on {sample['data directory on']}"
        if sample and sample.get("data directory on")
        else ""
    )
    if entries and all(durable(r) for r in entries):
        return f"PostgreSQL with its durable defaults ({shown}{disk})"
    return (
        f"PostgreSQL with its durable defaults ({shown}{disk}) except where a figure is "
        "labelled NOT DURABLE"
    )


def headline(doc: Mapping[str, Any]) -> list[str]:
    """The figures the README quotes, one Markdown bullet each (a figure measured with
    PostgreSQL not durable is labelled so)."""
    out: list[str] = []

    def add(name: str, text: str) -> None:
        out.append(text + pg_label(doc.get(name, {})))

    def lat(name: str, label: str) -> None:
        r = doc.get(name)
        if r and "median_ms" in r:
            add(
                name,
                f"{label}: median {fmt_ms(r['median_ms'])} ms, p99 {fmt_ms(r['p99_ms'])} ms "
                f"({verdict(r)}; goal {_latency_goal(r)})",
            )

    cap = doc.get("liveness_capacity")
    if cap and "max_agents" in cap:
        kill = cap.get("kill_to_offline") or {}
        add(
            "liveness_capacity",
            f"agents one liveness replica holds with heartbeat ack p99 ≤ 100 ms, each agent "
            f"on its own connection with HTTP/2 keepalive, heartbeats every "
            f"{cap.get('heartbeat_interval_ms', 30000) / 1000:.0f} s: "
            f"**{cap['max_agents']:,}** (goal {cap.get('goal_agents', 10000):,}; "
            f"{verdict(cap)}); {cap.get('rss_per_agent_kib')} KiB server RSS per agent, "
            f"{cap.get('open_connections', 0):,} connections; kill → offline while loaded: "
            f"median {fmt_ms(kill.get('median_ms'))} ms, max {fmt_ms(kill.get('max_ms'))} ms",
        )

    lat("kill_to_offline", "kill → offline")
    hb = doc.get("heartbeat_load")
    if hb and "median_ms" in hb:
        add(
            "heartbeat_load",
            f"heartbeat ack at 1,000 participants beating every second (10 streams per "
            f"connection): median {fmt_ms(hb['median_ms'])} ms, "
            f"p99 {fmt_ms(hb['p99_ms'])} ms, {hb.get('heartbeats_per_s', 0):.0f} heartbeats/s "
            f"({verdict(hb)}; goal {_latency_goal(hb)})",
        )
    lat("send_to_receipt", "send → receipt")
    for name, (_bench, label, _entries) in AUTH_COSTS.items():
        c = doc.get(name)
        if not c or "variants" not in c:
            continue
        v = c["variants"]
        added = c.get("added_median_pct", {})
        medians = " / ".join(fmt_ms(v[k].get("median_ms")) for k in ("plain", "auth", "auth+TLS"))
        p99s = " / ".join(fmt_ms(v[k].get("p99_ms")) for k in ("plain", "auth", "auth+TLS"))
        add(
            _bench,
            f"{label}, plain / auth / auth+TLS: median {medians} ms, p99 {p99s} ms; "
            f"median added by auth {_pct(added.get('auth'))}, by auth+TLS "
            f"{_pct(added.get('auth+TLS'))} ({verdict(c)}; goal ≤ "
            f"{c.get('goal_added_median_pct', 10):g} %)",
        )
    lat("kill_to_recorded", "kill → recorded (daemon)")
    dl = doc.get("deadline_lag")
    if dl and "p99_ms" in dl:
        add(
            "deadline_lag",
            f"deadline lag: p99 {fmt_ms(dl['p99_ms'])} ms over {dl.get('n'):,} deadlines "
            f"({verdict(dl)}; goal {_latency_goal(dl)})",
        )
    sp = doc.get("scheduler_pass_flat")
    if sp and "ratio" in sp:
        sizes = sp.get("sizes", {})
        small, big = (sizes.get(k, {}).get("median_ms") for k in ("10000", "1000000"))
        add(
            "scheduler_pass_flat",
            f"scheduler pass, 1,000,000 vs 10,000 rows: ratio {sp['ratio']:.2f} "
            f"(medians {fmt_ms(big)} / {fmt_ms(small)} ms; {verdict(sp)}, goal ≤ 2)",
        )
    lc = doc.get("tasks_lifecycle_rate")
    if lc and "grpc_lifecycles_per_s" in lc:
        g, s = lc["grpc_lifecycles_per_s"], lc["sql_lifecycles_per_s"]
        if "ratio" in lc:
            add(
                "tasks_lifecycle_rate",
                f"task lifecycles/s (send → claim → start → complete), {lc.get('workers', 32)} "
                f"concurrent roles: {g:.1f} through gRPC vs {s:.1f} for the same statements "
                f"through bare asyncpg, ratio {lc['ratio']:.2f} (goal ≥ "
                f"{lc.get('goal_ratio', 0.5):g}; {verdict(lc)}); statements per lifecycle "
                f"{_num(lc.get('statements_per_lifecycle_grpc'))} via gRPC, "
                f"{_num(lc.get('statements_per_lifecycle_sql'))} bare",
            )
        else:  # an older entry
            add(
                "tasks_lifecycle_rate",
                f"task lifecycles/s (send → claim → start → complete): {g:.1f} through gRPC, "
                f"{s:.1f} as the bare statements through asyncpg (ratio {s / g:.1f}x)",
            )
    tp = doc.get("task_throughput")
    if tp and tp.get("tasks_per_s") is not None:
        add(
            "task_throughput",
            f"tasks/s end to end, 20 senders and 20 agents on long-lived sessions: "
            f"{tp['tasks_per_s']:.1f} vs procrastinate's "
            f"{_num(tp.get('procrastinate_jobs_per_s'))} jobs/s on the same PostgreSQL, "
            f"ratio {_num(tp.get('ratio_to_procrastinate'))}; "
            f"{_num(tp.get('statements_per_lifecycle'))} statements per lifecycle "
            f"({verdict(tp)})",
        )
    return out


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:+.1f} %"


# -- plots -----------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(name: str, r: Mapping[str, Any], title: str, path: Path) -> None:
    plt = _plt()
    samples = sorted(r["samples_ms"])
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(10, 3.6))
    n = len(samples)
    hist.hist(samples, bins=min(60, max(10, n // 3)), color="#4477aa")
    hist.set_xlabel("ms")
    hist.set_ylabel("samples" + (" (log)" if n > 1000 else ""))
    if n > 1000:
        hist.set_yscale("log")
    cdf.plot(samples, [(i + 1) / n for i in range(n)], color="#4477aa")
    if samples and samples[0] > 0 and samples[-1] > 20 * samples[len(samples) // 2]:
        cdf.set_xscale("log")  # a long tail: the log scale shows it and the body both
    cdf.set_xlabel("ms" + (" (log)" if cdf.get_xscale() == "log" else ""))
    cdf.set_ylabel("fraction ≤ x")
    cdf.set_ylim(0, 1.01)
    for ax in (hist, cdf):
        for key, style in (("median_ms", "--"), ("p99_ms", ":")):
            if r.get(key) is not None:
                ax.axvline(r[key], color="#cc6677", linestyle=style, label=key[:-3])
        ax.grid(alpha=0.3)
    cdf.legend(loc="lower right")
    thinned = r.get("samples_thinned_from")
    count = f"n = {r.get('n')}" + (f", {n} quantiles plotted" if thinned else "")
    fig.suptitle(f"{name}: {title} ({count})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_variants(title: str, entries: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """The latency distributions of a benchmark's server variants, one CDF each."""
    plt = _plt()
    fig, (body, tail) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"plain": "#228833", "auth": "#4477aa", "auth+TLS": "#cc6677"}
    for label, r in entries.items():
        samples = sorted(r.get("samples_ms") or [])
        if not samples:
            continue
        n = len(samples)
        frac = [(i + 1) / n for i in range(n)]
        color = colors.get(label, "grey")
        body.plot(samples, frac, color=color, label=f"{label} (median {fmt_ms(r['median_ms'])})")
        tail.plot(samples, [1 - f + 1 / n for f in frac], color=color, label=label)
    body.set_xlim(0, max(r.get("p90_ms") or 0 for r in entries.values()) * 1.5 or None)
    body.set_xlabel("ms")
    body.set_ylabel("fraction ≤ x")
    body.set_ylim(0, 1.01)
    body.legend(loc="lower right")
    tail.set_xscale("log")
    tail.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    tail.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    tail.xaxis.set_minor_formatter(NullFormatter())
    tail.set_xlabel("ms (log)")
    tail.set_ylabel("fraction > x (log)")
    tail.axhline(0.01, color="grey", linestyle=":", label="p99")
    tail.legend(loc="lower left")
    for ax in (body, tail):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: plain / auth / auth+TLS servers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_capacity(r: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    steps = [s for s in r["steps"] if "acks" in s]
    x = [s["participants"] for s in steps]
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(10, 3.6))
    lat.plot(x, [s["ack_p99_ms"] for s in steps], "o-", label="ack p99", color="#cc6677")
    lat.plot(x, [s["ack_median_ms"] for s in steps], "o-", label="ack median", color="#4477aa")
    lat.plot(
        x, [s["kill_to_offline_max_ms"] for s in steps], "^:", label="kill → offline, max",
        color="#228833",
    )  # fmt: skip
    lat.axhline(100, color="grey", linestyle="--", label="100 ms")
    lat.set_yscale("log")
    interval_s = r.get("heartbeat_interval_ms", 30000) / 1000
    lat.set_xlabel(f"agents (own connection each, a beat every {interval_s:.0f} s)")
    lat.set_ylabel("ms")
    lat.legend(fontsize=8)
    mem.plot(x, [s["server_rss_mb"] for s in steps], "o-", color="#4477aa", label="server")
    mem.plot(x, [s["generators_rss_mb"] for s in steps], "s--", color="#aaaaaa", label="generators")
    mem.set_xlabel("agents")
    mem.set_ylabel("RSS, MiB")
    mem.legend(loc="upper left", fontsize=8)
    per = mem.twinx()
    per.plot(x, [s["rss_per_agent_kib"] for s in steps], "s:", color="#ccbb44")
    per.set_ylabel("server RSS per agent, KiB", color="#aa9922")
    per.set_ylim(0, max([s["rss_per_agent_kib"] for s in steps] or [1]) * 1.3)
    for ax in (lat, mem):
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"liveness_capacity: one liveness replica; max sustained {r.get('max_agents', 0):,} agents",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the Markdown ------------------------------------------------------------------------


def _table(doc: Mapping[str, Any], names: list[str]) -> list[str]:
    lines = [
        "| benchmark | n | median ms | p90 ms | p99 ms | max ms | goal | result |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name in names:
        r = doc[name]
        cells = [fmt_ms(r.get(k)) for k in ("median_ms", "p90_ms", "p99_ms", "max_ms")]
        goal = str(r.get("goal", "")).replace("|", "\\|")
        lines.append(
            f"| {name}{pg_label(r, short=True)} | {r.get('n', '-')} | {' | '.join(cells)} | {goal} "
            f"| {verdict(r)} |"
        )
    return lines


def _capacity_table(r: Mapping[str, Any]) -> list[str]:
    lines = [
        "| agents | connections | joins/s | heartbeats/s | ack median ms | ack p99 ms "
        "| ack max ms | kill → offline ms | server RSS MiB | RSS/agent KiB | generators RSS MiB "
        "| CPU server / postgres / generators / other work (% of a core) | sustained |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for s in r["steps"]:
        if "acks" not in s:
            lines.append(
                f"| {s['participants']:,} | | | | | | | | | | | only {s['joined']:,} joined "
                f"({s['join_errors']} errors) in {s['join_s']} s | **no** |"
            )
            continue
        cpu = s.get("cpu_pct", {})
        kills = ", ".join(f"{x:.1f}" for x in s.get("kill_to_offline_ms", []))
        lines.append(
            f"| {s['participants']:,} | {s['open_connections']:,} | {s['joins_per_s']:.0f} "
            f"| {s['heartbeats_per_s']:.0f} | {fmt_ms(s['ack_median_ms'])} "
            f"| {fmt_ms(s['ack_p99_ms'])} | {fmt_ms(s['ack_max_ms'])} | {kills} "
            f"| {s['server_rss_mb']:.1f} | {s['rss_per_agent_kib']:.1f} "
            f"| {s['generators_rss_mb']:.0f} "
            f"| {cpu.get('server', 0):.0f} / {cpu.get('postgres', 0):.0f} "
            f"/ {cpu.get('load generators', 0):.0f} / {max(0.0, cpu.get('others', 0)):.0f} "
            f"| {'yes' if s['sustained'] else '**no**'} |"
        )
    return lines


def write(results_path: Path, out_dir: Path = DOCS_DIR) -> Path:
    """Write REPORT.md and the PNGs from `results_path`; returns the report's path."""
    doc = json.loads(results_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    machine = doc.get("machine", {})
    names = _benchmarks(doc)
    dates = sorted({doc[n].get("date", "") for n in names} - {""})

    md = [
        "# Vigil benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`; `python -m bench --report-only` "
        f"rewrites this page from `bench/results/{results_path.name}`). Do not edit by hand.",
        "",
        f"- **Machine:** {machine_line(machine)}",
        f"- **Run:** {' … '.join(dict.fromkeys([dates[0], dates[-1]])) if dates else '?'} (UTC; "
        "the date each benchmark's figures were written)",
        f"- **PostgreSQL:** {settings_line(doc, names)}.",
        "- **Setup:** everything on one machine over loopback: the embedded PostgreSQL, "
        "the Vigil server processes, and the load generators and agents, which compete "
        "with the server for the same cores.",
        "",
        "## Headline figures",
        "",
        *[f"- {line}" for line in headline(doc)],
        "",
        "## All benchmarks",
        "",
        *_table(doc, names),
        "",
        "Latencies are per sample, in milliseconds; percentiles interpolate between closest "
        "ranks. A benchmark whose goal is not a latency (scheduler_pass_flat, "
        "tasks_lifecycle_rate, liveness_capacity) still reports the latency it measured.",
        "",
    ]

    md += _auth_cost_section(doc, out_dir)

    cap = doc.get("liveness_capacity")
    if cap and cap.get("steps"):
        if any("acks" in st for st in cap["steps"]):
            plot_capacity(cap, out_dir / CAPACITY_PNG)
        kill = cap.get("kill_to_offline") or {}
        md += [
            "## Agents held by one liveness replica",
            "",
            "In the shape users run: every agent a client of its own on its own TCP "
            "connection with HTTP/2 keepalive at its defaults, the default heartbeat "
            f"interval ({cap.get('heartbeat_interval_ms', 30000) / 1000:.0f} s) and TTL, a "
            "token of its own; agents added step by step, each step measured over one "
            "heartbeat interval (every agent beats once in it) while a few more agent "
            "processes are SIGKILLed. The last step with heartbeat ack p99 ≤ 100 ms is "
            f"**{cap['max_agents']:,} agents** (goal {cap.get('goal_agents', 10000):,}; "
            f"{verdict(cap)}), {cap.get('rss_per_agent_kib')} KiB of server RSS per agent "
            f"(idle server {cap.get('server_rss_idle_mb')} MiB), kill → offline at that load "
            f"median {fmt_ms(kill.get('median_ms'))} / max {fmt_ms(kill.get('max_ms'))} ms"
            f"{pg_label(cap)}. Stopped: {cap.get('stopped_because')}. The load generators "
            "run on the same 2 cores (their CPU and RSS are in the table).",
            "",
            *_capacity_table(cap),
            "",
            *(
                [f"![liveness capacity]({CAPACITY_PNG})", ""]
                if (out_dir / CAPACITY_PNG).exists()
                else []
            ),
        ]

    plots = [n for n in names if n in LATENCY_PLOTS and doc[n].get("samples_ms")]
    if plots:
        md += ["## Latency distributions", ""]
        for name in plots:
            png = f"latency_{name}.png"
            plot_latency(name, doc[name], LATENCY_PLOTS[name], out_dir / png)
            md += [f"### {name}", "", f"![{name}]({png})", ""]

    md += ["## Notes per benchmark", ""]
    for name in names:
        r = doc[name]
        notes = list(r.get("notes") or [])
        if "error" in r:
            notes.append(f"BROKEN: {r['error']}")
        notes += [f"MISSED: {m}" for m in r.get("missed") or []]
        md += [f"### {name}", "", f"Run {r.get('date', '?')}.", ""]
        md += [f"- {n}" for n in notes] + [""]

    md += [
        "## Noise",
        "",
        f"The machine has {machine.get('cores')} cores. The load generators, agents, "
        "PostgreSQL and the server share them, so tail latencies include time spent "
        "waiting for a core, and every figure above is a floor for what the server "
        "achieves on a machine of its own. Each benchmark records where the CPU went "
        "during its window (notes above); a window where other work on the machine used "
        "more than a quarter of a core is marked NOISY. Runs on a shared or virtual machine "
        "vary by tens of percent from run to run, most in the p99 and max columns.",
        "",
    ]
    path = out_dir / REPORT
    path.write_text("\n".join(md))
    if out_dir == DOCS_DIR:
        update_readme(doc, README)
    return path


def _variant_facts(doc: Mapping[str, Any], entries: Mapping[str, str]) -> list[str]:
    """Side by side, from the variants' own entries: the servers' CPU, their rounds, the
    statements their databases ran."""
    runs = {v: doc[e] for v, e in entries.items() if e in doc and "error" not in doc[e]}
    out = []
    cpu = []
    for v, r in runs.items():
        pct = r.get("cpu_pct") or {}
        value = pct.get(f"{v} server", pct.get("server"))
        if value is not None:
            cpu.append(f"{v} {value:.0f}")
    if cpu:
        out.append("server CPU while measured, % of one core: " + ", ".join(cpu))
    if all(r.get("rounds") for r in runs.values()):
        out.append(
            "median / p99 ms per round: "
            + "; ".join(
                f"{v} "
                + ", ".join(
                    f"{fmt_ms(x.get('median_ms'))} / {fmt_ms(x.get('p99_ms'))}" for x in r["rounds"]
                )
                for v, r in runs.items()
            )
        )
    stmts = {v: r.get("pg_stat_statements_all_per_s") for v, r in runs.items()}
    if all(x is not None for x in stmts.values()):
        out.append(
            "statements/s run on the server's database (pg_stat_statements): "
            + ", ".join(f"{v} {x:.1f}" for v, x in stmts.items())
        )
    return out


def _auth_cost_section(doc: Mapping[str, Any], out_dir: Path) -> list[str]:
    """What authentication and TLS cost: the variants of each compared benchmark side by
    side, how they were measured, and their distributions."""
    costs = [n for n in AUTH_COSTS if n in doc and "variants" in doc[n]]
    if not costs:
        return []
    md = [
        "## Cost of authentication and TLS",
        "",
        *AUTH_COST_METHOD,
        "",
        "| benchmark | server | n | median ms | p90 ms | p99 ms | median added | p99 added "
        "| goal (median added) | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name in costs:
        c = doc[name]
        _bench, label, entries = AUTH_COSTS[name]
        for variant in ("plain", "auth", "auth+TLS"):
            f = c["variants"].get(variant, {})
            added = c.get("added_median_pct", {}).get(variant)
            added_p99 = c.get("added_p99_pct", {}).get(variant)
            base = variant == "plain"
            goal = f"≤ {c.get('goal_added_median_pct', 10):g} %"
            ok = added is not None and added <= c.get("goal_added_median_pct", 10)
            lines = (
                f"| {label} | {variant} (`{entries[variant]}`) | {f.get('n', '-')} "
                f"| {fmt_ms(f.get('median_ms'))} | {fmt_ms(f.get('p90_ms'))} "
                f"| {fmt_ms(f.get('p99_ms'))} "
                f"| {'baseline' if base else _pct(added)} | {'' if base else _pct(added_p99)} "
                f"| {'' if base else goal} | {'' if base else 'pass' if ok else '**MISSED**'} |"
            )
            md.append(lines)
    md.append("")
    for name in costs:
        _bench, label, entries = AUTH_COSTS[name]
        runs = {v: doc[e] for v, e in entries.items() if e in doc and doc[e].get("samples_ms")}
        dates = sorted({doc[e].get("date", "") for e in entries.values() if e in doc})
        md += [f"### {label}", "", f"Run {' … '.join(dict.fromkeys(dates)) or '?'}.", ""]
        md += [f"- {n}" for n in doc[name].get("notes") or []]
        md += [f"- {n}" for n in _variant_facts(doc, entries)]
        md += [f"- MISSED: {m}" for m in doc[name].get("missed") or []]
        md.append("")
        if len(runs) == len(entries):
            png = f"auth_cost_{name.removesuffix('_auth_cost')}.png"
            plot_variants(label, runs, out_dir / png)
            md += [f"![{label}: plain, auth, auth+TLS]({png})", ""]
    return md


def readme_block(doc: Mapping[str, Any]) -> list[str]:
    names = _benchmarks(doc)
    dates = sorted({doc[n].get("date", "")[:10] for n in names} - {""})
    when = " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "?"
    return [
        README_START,
        f"From [the latest report](docs/bench/{REPORT}) ({when}), measured on "
        f"{machine_line(doc.get('machine', {}))}; {settings_line(doc, names)}; the load "
        "generators, agents and PostgreSQL share the machine with the server (a floor for a "
        "server on a machine of its own):",
        "",
        *[f"- {line}" for line in headline(doc)],
        README_END,
    ]


def update_readme(doc: Mapping[str, Any], readme: Path) -> None:
    """Replace the headline block of the README's Benchmarks section (between the
    markers) with the figures of `doc`, so that the README quotes the latest report."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return
    block = "\n".join(readme_block(doc))
    readme.write_text(text[:start] + block + text[end + len(README_END) :])
