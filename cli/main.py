"""The `vigil` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import warnings
from collections.abc import Coroutine, Sequence
from typing import Any

from vigil.cli.rpc import CliError, client_config
from vigil.core import logs, validation
from vigil.core.config import Settings
from vigil.core.errors import ConfigError, VigilError
from vigil.core.vocab import TaskStatus

# The task commands, run by cli.task_cmds (listed here so --help needs no import of it).
TASK_COMMANDS = frozenset({"chatroom", "chatrooms", "send", "task", "tasks", "notifications"})
# The machine commands, run by cli.machine_cmds.
MACHINE_COMMANDS = frozenset({"machine", "machines", "agents", "agent", "commands"})
# Task status names (vigil.v1.Task.status), for `vigil tasks --status`.
TASK_STATUSES = TaskStatus.values()

EXIT_CODES = """exit codes:
  0    success (wait-for-task: also when --timeout passed with no task)
  1    error: server unreachable, request refused, internal failure
  2    usage error: a bad flag, argument or environment variable
  3    superseded: another wait-for-task took the same chatroom and role
  130  interrupted by SIGINT (after leaving)
  143  terminated by SIGTERM (after leaving)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage dump: the user mistake and how to get help.
        raise CliError(f"{message} (see `{self.prog} --help`)", 2)


ADDR_HELP = (
    "Vigil's address: HOST:PORT, IP:PORT,IP:PORT (replicas) or dns:///NAME:PORT "
    "(default: $VIGIL_ADDR or 127.0.0.1:7070)"
)
TOKEN_HELP = (
    "file holding the bearer token (default: $VIGIL_TOKEN_FILE, $VIGIL_TOKEN, "
    "then $VIGIL_DATA_DIR/admin.token)"
)


def _client_flags(p: argparse.ArgumentParser) -> None:
    """--addr and --token-file: how a client command reaches Vigil and proves who it is."""
    p.add_argument("--addr", help=ADDR_HELP)
    p.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)


def _server_flags(p: argparse.ArgumentParser) -> None:
    """--addr, --metrics-addr and the listeners' security."""
    p.add_argument("--addr", help="listen address (default: $VIGIL_ADDR or 127.0.0.1:7070)")
    p.add_argument("--metrics-addr", help="metrics address (default: 127.0.0.1:9464)")
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve TLS with this certificate ($VIGIL_SERVER_TLS_CERT)",
    )
    p.add_argument("--tls-key", metavar="FILE", help="its private key ($VIGIL_SERVER_TLS_KEY)")
    p.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="mutual TLS: require client certificates from this CA; a machine's certificate "
        "then proves its daemon ($VIGIL_SERVER_TLS_CLIENT_CA)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback address (anyone on the path can read and "
        "forge traffic; $VIGIL_INSECURE=1)",
    )
    p.add_argument(
        "--reflection",
        action="store_true",
        help="serve gRPC reflection (off by default; $VIGIL_REFLECTION=1)",
    )


def version() -> str:
    """This installation's version (the package metadata, as `vigil.__version__`)."""
    from importlib import metadata

    try:
        return metadata.version("vigil")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vigil",
        description="Vigil: the reliability control plane for teams of AI coding agents.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"vigil {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    up = sub.add_parser(
        "up", help="run every service in one process (embedded database by default)"
    )
    _server_flags(up)
    up.add_argument(
        "--no-ui", action="store_true", help="no live view: logs on stderr (default off a terminal)"
    )
    up.add_argument(
        "--log-format", choices=["text", "json"], help="logs as text (default) or JSON lines"
    )

    lv = sub.add_parser("liveness", help="the liveness service")
    lv_sub = lv.add_subparsers(
        dest="liveness_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    lv_serve = lv_sub.add_parser("serve", help="run the liveness service alone")
    _server_flags(lv_serve)

    ts = sub.add_parser("task-service", help="the task service")
    ts_sub = ts.add_subparsers(
        dest="task_service_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    ts_serve = ts_sub.add_parser("serve", help="run the task service alone")
    _server_flags(ts_serve)

    sub.add_parser(
        "demo",
        help="a guided tour on a throwaway database (about a minute; leaves nothing running)",
    )

    dm = sub.add_parser("daemon", help="this machine's daemon (runs remote agents)")
    dm_sub = dm.add_subparsers(
        dest="daemon_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    dm_start = dm_sub.add_parser(
        "start",
        help="run the daemon in the foreground (also: vigil-daemon)",
        description="Takes start/stop commands for this machine, runs and watches its "
        "agents, and reports every exit (kept on disk until acknowledged).",
    )
    dm_start.add_argument("--machine-id", required=True, metavar="MACHINE")
    dm_start.add_argument(
        "--credential-file", help="default: $VIGIL_DATA_DIR/machines/MACHINE.credential"
    )
    dm_start.add_argument(
        "--state-dir",
        help="children, outbox and agent logs (default: $VIGIL_DATA_DIR/daemon/MACHINE)",
    )
    dm_start.add_argument(
        "--leave-agents", action="store_true", help="on SIGTERM, leave agents running"
    )
    dm_start.add_argument(
        "--harness-file",
        metavar="FILE",
        help="what this machine runs: harness = [program, args] "
        "(default: $VIGIL_DATA_DIR/machines/MACHINE.harnesses.toml)",
    )
    dm_start.add_argument(
        "--allow-any-command",
        action="store_true",
        help="also run free-form command lines the server sends (anyone who may create "
        "a role on this machine can then run any program here)",
    )
    _client_flags(dm_start)
    dm_start.add_argument(
        "--metrics-addr", help="serve the daemon's Prometheus metrics here (HOST:PORT)"
    )
    dm_start.add_argument(
        "--agent-tls-cert",
        metavar="FILE",
        help="under mutual TLS: the client certificate its agents present (one naming no "
        "machine; the daemon's own never reaches them)",
    )
    dm_start.add_argument("--agent-tls-key", metavar="FILE", help="that certificate's key")

    w = sub.add_parser(
        "wait-for-task",
        help="join as a participant and wait for a task",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--chatroom", help="default: $VIGIL_CHATROOM (set for daemon-run agents)")
    w.add_argument("--role", help="default: $VIGIL_ROLE (set for daemon-run agents)")
    w.add_argument("--kind", choices=["remote", "custom"], help="default: $VIGIL_KIND, else custom")
    w.add_argument("--timeout", help="give up after DURATION (e.g. 30s, 5m, 1m30s); exits 0")
    w.add_argument("--json", action="store_true", help="print the task as JSON")
    _client_flags(w)

    ps = sub.add_parser("participants", help="list participants")
    ps.add_argument("--chatroom")
    ps.add_argument("--live", action="store_true", help="only live participants")
    ps.add_argument("--json", action="store_true", help="JSON output")
    _client_flags(ps)

    _add_task_commands(sub)
    _add_machine_commands(sub)
    _add_token_commands(sub)
    _add_tls_commands(sub)

    au = sub.add_parser("audit", help="check the audit log")
    au_sub = au.add_subparsers(
        dest="audit_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    verify = au_sub.add_parser(
        "verify",
        help="walk the audit log's hash chains; exit 1 naming the first broken link",
        description="Every task's status changes form a hash chain; this recomputes it "
        "and reports the first row edited, removed or inserted since it was written.",
    )
    verify.add_argument("--task", metavar="ID", help="only this task's chain")
    verify.add_argument("--json", action="store_true", help="JSON output")
    _client_flags(verify)

    comp = sub.add_parser(
        "completion",
        help="print a shell completion script "
        "(e.g. `vigil completion bash > ~/.local/share/bash-completion/completions/vigil`)",
    )
    comp.add_argument("shell", choices=["bash", "zsh", "tcsh"])

    mig = sub.add_parser(
        "migrate",
        help="apply migrations and create the database roles, as the owner (DATABASE_URL)",
        description="Applies every migration and (re)grants the roles vigil_liveness, "
        "vigil_tasks and vigil_readonly, creating them if missing. Run it as the owner of "
        "Vigil's schemas (docs/operations.md); servers then may start with VIGIL_MIGRATE=0. "
        "A database migrated by a newer Vigil is refused (exit 1).",
    )
    mig.add_argument(
        "--status",
        action="store_true",
        help="change nothing: print each migration, applied, pending or unknown "
        "(applied by a newer Vigil), one per line",
    )
    mig.add_argument("--json", action="store_true", help="with --status: a JSON array")
    return p


def _add_token_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """token create|list|revoke (run by cli.token_cmds)."""
    tk = sub.add_parser("token", help="create, list or revoke the tokens that may call Vigil")
    tk_sub = tk.add_subparsers(
        dest="token_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    create = tk_sub.add_parser(
        "create",
        help="create a token; its secret is printed once, alone on stdout",
        description="Create a token: --admin (everything), --read-only (read everything) "
        "or --chatroom C (one chatroom: join, take and work its tasks, send to it; with "
        "--role R only that role). The secret is printed once; keep it in an owner-only "
        "file (VIGIL_TOKEN_FILE).",
    )
    create.add_argument("--admin", action="store_true", help="may do everything")
    create.add_argument("--read-only", action="store_true", help="may read everything")
    create.add_argument("--chatroom", metavar="C", help="may act in chatroom C only")
    create.add_argument("--role", metavar="R", help="with --chatroom: as role R only")
    create.add_argument("--ttl", metavar="DURATION", help="expires after DURATION (e.g. 8h, 30d)")
    create.add_argument("--name", metavar="NAME", help="who or what it is for (shown in audits)")
    ls = tk_sub.add_parser("list", help="list tokens (never their secrets)")
    ls.add_argument("--all", action="store_true", help="revoked and expired ones too")
    rv = tk_sub.add_parser("revoke", help="revoke a token: its open streams end within a second")
    rv.add_argument("id", metavar="ID", help="the token id (`vigil token list`)")
    rv.add_argument("--reason", help="why (kept with the token)")
    for p in (create, ls, rv):
        p.add_argument("--json", action="store_true", help="JSON output")
        _client_flags(p)


def _add_tls_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    tls = sub.add_parser("tls", help="certificates for trying TLS and mutual TLS locally")
    tls_sub = tls.add_subparsers(
        dest="tls_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    ca = tls_sub.add_parser(
        "dev-ca",
        help="write a development CA, a server certificate and client certificates",
        description="Writes ca.pem, server.pem/.key (for --host names), one certificate "
        "per --machine (naming it: under mutual TLS it proves that machine's daemon) and "
        "per --client (naming nobody). Keys are owner-only. For trying TLS, not for "
        "production: use your own CA there.",
    )
    ca.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    ca.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="a name or IP the server is reached by (repeatable; default: localhost, "
        "127.0.0.1, ::1)",
    )
    ca.add_argument("--machine", action="append", default=[], metavar="ID", help="(repeatable)")
    ca.add_argument(
        "--client", action="append", metavar="NAME", help="(repeatable; default: client)"
    )
    ca.add_argument("--days", type=int, default=30, help="validity (default 30)")


def _add_task_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """chatroom, chatrooms, send, task, tasks, notifications (run by cli.task_cmds)."""
    json_help = "JSON output"
    cr = sub.add_parser("chatroom", help="create, show, update or delete a chatroom")
    cr_sub = cr.add_subparsers(
        dest="chatroom_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    create = cr_sub.add_parser(
        "create",
        help="create a chatroom and its team of roles",
        description="Create a chatroom. Each --role is ROLE=custom (run by a person) or "
        "ROLE=remote:MACHINE:HARNESS (started by MACHINE's daemon, which runs the program "
        "its own harness file gives for HARNESS).",
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--role",
        action="append",
        metavar="ROLE=KIND",
        help="ROLE=custom or ROLE=remote:MACHINE:HARNESS (repeatable)",
    )
    create.add_argument(
        "--team-file",
        metavar="FILE",
        help='JSON {"roles": [{"role", "kind": "remote|custom", "machine", "harness"}]} '
        '("command": a command line, instead of a harness)',
    )
    show = cr_sub.add_parser("show", help="show a chatroom and its roles")
    show.add_argument("name", metavar="NAME")
    update = cr_sub.add_parser(
        "update",
        help="add or remove roles",
        description="Add roles (ROLE=custom or ROLE=remote:MACHINE:HARNESS) and remove "
        "roles. A role with unfinished tasks cannot be removed; a removed remote role's "
        "agent is stopped. Its history stays, so its name stays taken.",
    )
    update.add_argument("name", metavar="NAME")
    update.add_argument("--add-role", action="append", metavar="ROLE=KIND", help="(repeatable)")
    update.add_argument("--remove-role", action="append", metavar="ROLE", help="(repeatable)")
    delete = cr_sub.add_parser(
        "delete",
        help="delete a chatroom (its history is kept)",
        description="Refused while the chatroom has unfinished tasks, unless --cancel-open "
        "(they are closed). Its remote agents are stopped; it disappears from listings and "
        "takes no more tasks; its tasks and their history are kept.",
    )
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--cancel-open", action="store_true", help="close unfinished tasks")
    delete.add_argument("--reason", help="why (kept in the closed tasks' history)")
    for p in (create, show, update, delete):
        p.add_argument("--json", action="store_true", help=json_help)
        _client_flags(p)

    crs = sub.add_parser("chatrooms", help="list chatrooms")
    crs.add_argument("--json", action="store_true", help=json_help)
    _client_flags(crs)

    snd = sub.add_parser(
        "send",
        help="send a message to a role: it becomes a task",
        description="Send TEXT (the words joined by spaces; a single - reads stdin) to a "
        "role. Prints the new task, its id first.",
    )
    snd.add_argument("--chatroom", required=True)
    snd.add_argument("--role", required=True)
    snd.add_argument("text", nargs="+", metavar="TEXT")
    snd.add_argument("--json", action="store_true", help=json_help)
    _client_flags(snd)

    tk = sub.add_parser("task", help="act on one task: start, complete, cancel, release, show")
    tk_sub = tk.add_subparsers(
        dest="task_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    actions = {
        "start": "acknowledged → in_progress (give the attempt you were handed)",
        "complete": "acknowledged or in_progress → completed (give the attempt)",
        "cancel": "close the task",
        "release": "hand an acknowledged or in-progress task back: pending again",
        "show": "show one task",
        "history": "every status change of a task (the audit log)",
    }
    for action, text in actions.items():
        a = tk_sub.add_parser(action, help=text)
        a.add_argument("id", metavar="ID")
        if action in ("start", "complete"):
            a.add_argument("--attempt", type=int, required=True, help="the task's attempt")
        if action in ("cancel", "release"):
            a.add_argument("--reason", help="why (kept in the task's history)")
        a.add_argument("--json", action="store_true", help=json_help)
        _client_flags(a)

    tks = sub.add_parser("tasks", help="list tasks")
    tks.add_argument("--chatroom")
    tks.add_argument("--status", choices=TASK_STATUSES)
    tks.add_argument("--limit", type=int, default=0, help="at most N tasks (default 1000)")
    tks.add_argument("--json", action="store_true", help=json_help)
    _client_flags(tks)

    nt = sub.add_parser("notifications", help="list notifications (timeouts, restarts, …)")
    nt.add_argument("--follow", action="store_true", help="keep printing new ones until ^C")
    nt.add_argument("--json", action="store_true", help="JSON (one object per line with --follow)")
    _client_flags(nt)


def _add_machine_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """machine register, machines, agents, agent start|stop, commands (cli.machine_cmds)."""
    json_help = "JSON output"
    mc = sub.add_parser("machine", help="register a machine (its daemon runs remote agents)")
    mc_sub = mc.add_subparsers(
        dest="machine_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    reg = mc_sub.add_parser(
        "register",
        help="register a machine and keep its credential in an owner-only file",
        description="Register a machine (again: rotates its credential). The credential is "
        "written to --credential-file (default $VIGIL_DATA_DIR/machines/MACHINE.credential) "
        "with mode 600 and never printed.",
    )
    reg.add_argument("--machine-id", required=True, metavar="MACHINE")
    reg.add_argument("--hostname", help="default: this host's name")
    reg.add_argument(
        "--harness",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="an agent harness the machine can run, e.g. claude (repeatable)",
    )
    reg.add_argument("--credential-file", metavar="FILE", help="where to write the credential")
    reg.add_argument("--json", action="store_true", help=json_help)
    _client_flags(reg)
    unreg = mc_sub.add_parser(
        "unregister",
        help="forget a machine: its daemon and its agents are refused at once",
        description="Unregister a machine: its credential and every credential of its "
        "agents stop working within a second, its agents show stopped, and the tasks they "
        "held are pending again.",
    )
    unreg.add_argument("--machine-id", required=True, metavar="MACHINE")
    unreg.add_argument("--reason", help="why (kept with the revoked credentials)")
    unreg.add_argument("--json", action="store_true", help=json_help)
    _client_flags(unreg)

    ms = sub.add_parser("machines", help="list registered machines")
    ms.add_argument("--json", action="store_true", help=json_help)
    _client_flags(ms)

    ags = sub.add_parser("agents", help="list agents run by machine daemons")
    ags.add_argument("--chatroom")
    ags.add_argument("--json", action="store_true", help=json_help)
    _client_flags(ags)

    ag = sub.add_parser("agent", help="start or stop the agent of a remote role")
    ag_sub = ag.add_subparsers(
        dest="agent_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    actions = {
        "start": "desired state running: start it now",
        "stop": "desired state stopped: stop it; it stays stopped",
    }
    for action, text in actions.items():
        a = ag_sub.add_parser(action, help=text)
        a.add_argument("--chatroom", required=True)
        a.add_argument("--role", required=True)
        a.add_argument("--json", action="store_true", help=json_help)
        _client_flags(a)

    cs = sub.add_parser("commands", help="list commands sent to machine daemons")
    cs.add_argument("--machine", metavar="MACHINE")
    cs.add_argument("--limit", type=int, default=0, help="at most N commands")
    cs.add_argument("--json", action="store_true", help=json_help)
    _client_flags(cs)


_SERVER_FLAGS = {
    "addr": "VIGIL_ADDR",
    "metrics_addr": "VIGIL_METRICS_ADDR",
    "tls_cert": "VIGIL_SERVER_TLS_CERT",
    "tls_key": "VIGIL_SERVER_TLS_KEY",
    "tls_client_ca": "VIGIL_SERVER_TLS_CLIENT_CA",
}


def _settings(args: argparse.Namespace) -> Settings:
    """A server's settings: its flags over the environment."""
    env = dict(os.environ)
    if args.command in SERVER_COMMANDS:
        for flag, var in _SERVER_FLAGS.items():
            if getattr(args, flag, None):
                env[var] = getattr(args, flag)
        if getattr(args, "insecure", False):
            env["VIGIL_INSECURE"] = "1"
        if getattr(args, "reflection", False):
            env["VIGIL_REFLECTION"] = "1"
    return Settings.from_env(env)


SERVER_COMMANDS = frozenset({"up", "liveness", "task-service", "demo", "migrate"})
# The long-running servers run on uvloop: measured in bench/throughput.py, a server
# spends about 13-15 % less CPU per task than on asyncio's own loop (its socket I/O and
# callbacks are most of what is not gRPC's). VIGIL_EVENT_LOOP=asyncio opts out.
SERVING = frozenset({"up", "liveness", "task-service"})
EVENT_LOOPS = ("uvloop", "asyncio")


def _run(main: Coroutine[Any, Any, int], command: str | None) -> int:
    choice = (os.environ.get("VIGIL_EVENT_LOOP") or "uvloop").strip().lower()
    if choice not in EVENT_LOOPS:
        main.close()
        raise ConfigError(f"VIGIL_EVENT_LOOP must be uvloop or asyncio, got {choice!r}")
    if choice == "uvloop" and command in SERVING:
        try:
            import uvloop
        except ImportError:  # a platform without it (Windows): asyncio's loop serves
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    log_format = getattr(args, "log_format", None) or os.environ.get("VIGIL_LOG_FORMAT", "text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"VIGIL_LOG_FORMAT must be text or json, got {log_format!r}")
    if args.command in SERVER_COMMANDS:
        return await _serve(args, log_format)
    logs.configure(os.environ.get("VIGIL_LOG_LEVEL", "WARNING").upper(), log_format)
    if args.command == "tls":
        return _dev_ca(args)
    if args.command == "completion":
        import shtab

        print(shtab.complete(parser, shell=args.shell))
        return 0
    config = client_config(args)
    if args.command == "daemon":
        from vigil.cli.daemon_cmd import daemon_start

        logs.configure(os.environ.get("VIGIL_LOG_LEVEL", "INFO").upper(), log_format)
        return await daemon_start(
            config,
            args.machine_id,
            args.credential_file,
            args.state_dir,
            args.leave_agents,
            args.metrics_addr,
            args.harness_file,
            args.allow_any_command,
            (args.agent_tls_cert, args.agent_tls_key),
        )
    if args.command == "wait-for-task":
        from vigil.cli.durations import parse_duration
        from vigil.cli.wait_for_task import resolve_identity, wait_for_task

        chatroom, role, kind = resolve_identity(args.chatroom, args.role, args.kind, os.environ)
        timeout = parse_duration(args.timeout, "--timeout") if args.timeout is not None else None
        return await wait_for_task(config, chatroom, role, kind, timeout, as_json=args.json)
    if args.command == "participants":
        from vigil.cli.participants import participants

        return await participants(config, args.chatroom, args.live, args.json)
    if args.command in TASK_COMMANDS:
        from vigil.cli.task_cmds import run

        return await run(args, config)
    if args.command in MACHINE_COMMANDS:
        from vigil.cli.machine_cmds import run as run_machine

        return await run_machine(args, config, _settings(args).data_dir)
    if args.command == "token":
        from vigil.cli.token_cmds import run as run_token

        return await run_token(args, config)
    if args.command == "audit":
        from vigil.cli.task_cmds import verify_audit

        return await verify_audit(config, args.task, args.json)
    parser.print_help()
    return 2


def _dev_ca(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vigil.core.auth.tls import dev_ca

    if not 1 <= args.days <= 3650:
        raise CliError("--days must be between 1 and 3650", 2)
    for machine in args.machine:
        try:
            validation.name(machine, "--machine")
        except VigilError as exc:
            raise CliError(str(exc), 2) from None
    out = Path(args.out)
    try:
        written = dev_ca(
            out,
            hosts=args.host or ("localhost", "127.0.0.1", "::1"),
            machines=args.machine,
            clients=args.client or ("client",),
            days=args.days,
        )
    except OSError as exc:
        raise CliError(f"cannot write to {out}: {exc.strerror or exc}") from None
    print(f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written))
    return 0


async def _serve(args: argparse.Namespace, log_format: str) -> int:
    settings = _settings(args)
    ui = args.command == "up" and not args.no_ui and sys.stdout.isatty()
    logs.configure(settings.log_level, log_format, settings.data_dir / "vigil.log" if ui else None)
    from vigil.cli.serve import serve

    if args.command == "up":
        return await serve(settings, ui=ui)
    if args.command == "liveness":
        return await serve(settings, ("liveness",))
    if args.command == "task-service":
        return await serve(settings, ("tasks",))
    if args.command == "migrate":
        from vigil.cli.serve import migrate

        return await migrate(settings, status=args.status, as_json=args.json)
    from vigil.cli.demo import demo

    return await demo(settings.database_url)


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return _run(_dispatch(args, parser), args.command)
    except CliError as exc:
        return _fail(str(exc), exc.exit_code)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except VigilError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


def _fail(message: str, code: int) -> int:
    # One line, whatever the message quotes (a newline or escape a user typed).
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    try:
        print(f"vigil: error: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr itself is gone; the exit code still tells
    return code


if __name__ == "__main__":
    sys.exit(main())
