"""A network namespace joined to the host by a veth pair, for tests that shape or cut a link.

The pair gets a private /30 (10.213.N.0/30) that exists only on these two interfaces: the host end
is .1, the namespace end .2. `shape()` adds a tbf rate limit on both ends, `cut()` and `restore()`
set the host end down and up, `power_off()` and `power_on()` the namespace end, `cleanup()` removes the namespace and the pair. Names are unique per
process and instance (wd<pid>h<n>), so parallel test runs do not collide on names; the /30 is
derived from the pid and the instance number.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_counter = itertools.count()


def _ip(*arguments: str, netns: str | None = None) -> None:
    command = ["ip", *arguments] if netns is None else ["ip", "netns", "exec", netns, "ip", *arguments]
    subprocess.run(command, check=True, capture_output=True)


class NetNamespace:
    """A namespace `name` with interface `inner` (address `inner_address`), linked to `outer`
    (address `outer_address`) on the host."""

    def __init__(self) -> None:
        index = next(_counter)
        pid = os.getpid()
        self.name = f"wd{pid}n{index}"
        self.outer = f"wd{pid % 10**7}h{index % 100}"
        self.inner = f"wd{pid % 10**7}p{index % 100}"
        subnet = (pid * 7 + index) % 250 + 1
        self.outer_address = f"10.213.{subnet}.1"
        self.inner_address = f"10.213.{subnet}.2"
        self.created = False

    def create(self) -> "NetNamespace":
        """Create the namespace and the veth pair, address both ends and bring them up."""
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _ip("link", "set", self.inner, "netns", self.name)
        _ip("addr", "add", f"{self.outer_address}/30", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        _ip("addr", "add", f"{self.inner_address}/30", "dev", self.inner, netns=self.name)
        _ip("link", "set", self.inner, "up", netns=self.name)
        _ip("link", "set", "lo", "up", netns=self.name)
        return self

    def shape(self, rate: str = "20mbit", burst: str = "32kbit", latency: str = "400ms") -> None:
        """Limit both ends of the link with a token bucket filter."""
        tbf = ["qdisc", "add", "dev", "{dev}", "root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        subprocess.run(["tc", *[part.format(dev=self.outer) for part in tbf]], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "exec", self.name, "tc", *[part.format(dev=self.inner) for part in tbf]],
                       check=True, capture_output=True)

    def cut(self) -> None:
        """Take the link down (packets are dropped; TCP connections stall)."""
        _ip("link", "set", self.outer, "down")

    def restore(self) -> None:
        """Bring the link back up."""
        _ip("link", "set", self.outer, "up")

    def power_off(self) -> None:
        """Take the namespace's end down, as if its machine were switched off: the host's ARP queries go
        unanswered, so a connect hangs about 3 s before "No route to host" (a cut link fails at once)."""
        _ip("link", "set", self.inner, "down", netns=self.name)

    def power_on(self) -> None:
        """Bring the namespace's end back up."""
        _ip("link", "set", self.inner, "up", netns=self.name)

    def cleanup(self) -> None:
        """Delete the namespace (which deletes the pair) and the host end if it is still there."""
        if not self.created:
            return
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        self.created = False
