"""A network namespace of the soak's own, for partitions and a slow network.

    host                                      namespace `vigil-chaos-<pid>`
    veth vc<N>h  10.213.N.1/24               veth vc<N>n  10.213.N.2/24
                 10.213.N.10  (replica 0)
                 10.213.N.11  (replica 1)

The replicas listen on their own host-side addresses; processes started in the namespace
(a machine's daemon, and so its agents, and a custom role's driver) reach them only over
the veth pair. A partition from one replica drops every packet between the namespace and
that replica's address, both ways and silently, as a dead link does: a blackhole route in
the namespace, a blackhole policy rule on the host. The slow network is a token bucket
(`tc tbf`) on both ends of the veth. (This kernel has no `netem` qdisc: `tc netem loss
100%` is not available, the blackhole routes are the equivalent; the delay is queueing
behind a low rate, not a fixed added latency.)

Only this namespace and its veth pair are ever touched; `close()` removes both.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

# The slow network: a link this slow, with at most this much queue in front of it.
SLOW_RATE = "512kbit"
SLOW_QUEUE = "150ms"


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


def _tc(*args: str, ns: str | None = None) -> None:
    cmd = [*(["ip", "netns", "exec", ns] if ns else []), "tc", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


@dataclass
class Netns:
    replicas: int = 2
    n: int = field(default_factory=lambda: os.getpid() % 250 + 1)
    created: bool = False
    cut: set[int] = field(default_factory=set)
    slow: bool = False

    @property
    def name(self) -> str:
        return f"vigil-chaos-{os.getpid()}"

    @property
    def host_dev(self) -> str:
        return f"vc{self.n}h"

    @property
    def ns_dev(self) -> str:
        return f"vc{self.n}n"

    @property
    def inside(self) -> str:
        return f"10.213.{self.n}.2"

    def replica_host(self, index: int) -> str:
        return f"10.213.{self.n}.{10 + index}"

    def exec_prefix(self) -> list[str]:
        """Put in front of a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> Netns:
        self._remove_stale()
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        _ip("link", "set", self.ns_dev, "netns", self.name)
        _ip("addr", "add", f"10.213.{self.n}.1/24", "dev", self.host_dev)
        for i in range(self.replicas):
            _ip("addr", "add", f"{self.replica_host(i)}/32", "dev", self.host_dev)
        _ip("link", "set", self.host_dev, "up")
        _ip("addr", "add", f"{self.inside}/24", "dev", self.ns_dev, ns=self.name)
        _ip("link", "set", self.ns_dev, "up", ns=self.name)
        _ip("link", "set", "lo", "up", ns=self.name)
        return self

    def partition(self, index: int) -> None:
        """Drop every packet between the namespace and replica `index`, both ways."""
        host = self.replica_host(index)
        _ip("route", "add", "blackhole", f"{host}/32", ns=self.name)
        _ip("rule", "add", "from", host, "to", self.inside, "blackhole")
        self.cut.add(index)

    def heal(self, index: int) -> None:
        host = self.replica_host(index)
        _ip("route", "del", "blackhole", f"{host}/32", ns=self.name)
        _ip("rule", "del", "from", host, "to", self.inside, "blackhole")
        self.cut.discard(index)

    def slow_down(self) -> None:
        for ns, dev in ((None, self.host_dev), (self.name, self.ns_dev)):
            _tc("qdisc", "add", "dev", dev, "root", "tbf", "rate", SLOW_RATE, "burst", "4kb",
                "latency", SLOW_QUEUE, ns=ns)  # fmt: skip
        self.slow = True

    def speed_up(self) -> None:
        for ns, dev in ((None, self.host_dev), (self.name, self.ns_dev)):
            _tc("qdisc", "del", "dev", dev, "root", ns=ns)
        self.slow = False

    def close(self) -> None:
        for index in list(self.cut):
            try:
                self.heal(index)
            except NetnsError:
                pass
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True)
            self.created = False

    def _remove_stale(self) -> None:
        """Namespaces (and their rules) left by a soak whose process is gone."""
        done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if not name.startswith("vigil-chaos-"):
                continue
            pid = name.rsplit("-", 1)[1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        rules = subprocess.run(["ip", "rule", "list"], capture_output=True, text=True).stdout
        for line in rules.splitlines():
            if f"to {self.inside} blackhole" in line:
                words = line.split(":", 1)[1].split()
                subprocess.run(["ip", "rule", "del", *words], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True)
