"""What this machine runs for Vigil, decided on this machine: a local, owner-only TOML
file mapping harness names to programs. A start names a harness; the daemon runs the
program its own file gives for it, and nothing else. A free-form command line sent by
the server runs only if the machine's owner opted in (`allow_any_command`).

    # true: also run command lines the server sends (anyone who can create a role on
    # this machine can then run any program here, as this daemon's user)
    allow_any_command = false

    # Harnesses this machine runs for Vigil: name = [program, arguments...]
    [harnesses]
    example = ["/usr/bin/python3", "-m", "vigil.example_agent"]
    claude = ["claude", "--print"]
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vigil.core import validation
from vigil.core.errors import ConfigError, VigilError

FILE_MODE = 0o600


class Refused(Exception):
    """A start this machine does not allow; the message says why and what to change."""


def starter(python: str = sys.executable) -> str:
    """The file `vigil machine register` writes: the bundled example agent only."""
    return (
        "# What this machine runs for Vigil. Keep this file owner-only (chmod 600).\n"
        "\n"
        "# true: also run free-form command lines the server sends. Anyone allowed to create\n"
        "# a role on this machine could then run any program here as this daemon's user.\n"
        "allow_any_command = false\n"
        "\n"
        "# Harnesses: name = [program, arguments...]. A remote role names one (e.g.\n"
        "# --role builder=remote:MACHINE:example); the daemon runs only what is defined here.\n"
        "[harnesses]\n"
        f'example = [{json.dumps(python)}, "-m", "vigil.example_agent"]\n'
    )


def write_starter(path: Path) -> bool:
    """Write the starter file unless one exists; True if it was written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), FILE_MODE)
        f.write(starter())
    return True


@dataclass(frozen=True)
class Harnesses:
    programs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    allow_any_command: bool = False
    source: str = "(none)"

    @classmethod
    def load(cls, path: Path, *, allow_any_command: bool = False) -> Harnesses:
        where = f"harness file {path}"
        try:
            with path.open("rb") as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                if mode & 0o022:
                    raise ConfigError(
                        f"{where} is writable by others (mode {mode:04o}); chmod 600 {path}"
                    )
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(
                f"{where} does not exist: it says what this machine runs "
                "(`vigil machine register` writes a starter)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where} is not valid TOML: {exc}") from None
        unknown = set(data) - {"harnesses", "allow_any_command"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        table = data.get("harnesses", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [harnesses] must be a table of name = [program, ...]")
        programs: dict[str, tuple[str, ...]] = {}
        for name, argv in table.items():
            try:
                validation.name(name, "harness name")
            except VigilError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise ConfigError(f"{where}: {name} must be a list of strings [program, args...]")
            programs[name] = tuple(argv)
        opted_in = data.get("allow_any_command", False)
        if not isinstance(opted_in, bool):
            raise ConfigError(f"{where}: allow_any_command must be true or false")
        return cls(programs, opted_in or allow_any_command, str(path))

    def argv(self, harness: str, command: str) -> list[str]:
        """The program to run for a start, or Refused."""
        defined = ", ".join(sorted(self.programs)) or "none"
        if harness:
            program = self.programs.get(harness)
            if program is None:
                raise Refused(
                    f"harness {harness!r} is not defined on this machine "
                    f"(defined: {defined}; see {self.source})"
                )
            return list(program)
        if command:
            if not self.allow_any_command:
                raise Refused(
                    f"this machine runs only its harnesses ({defined}); a command line runs "
                    f"only where the machine's owner set allow_any_command in {self.source}"
                )
            argv = shlex.split(command)
            if not argv:
                raise Refused("the command line is empty")
            return argv
        raise Refused("the start names no harness")
