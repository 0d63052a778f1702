"""Build and remove the rehearsal cluster: a network namespace per node, a bridge, a cgroup per node.

Layout for ``--nodes 2 --iface ib0`` (``P`` = ``vsr<pid of vitscale-rehearse>``):

    namespace P-sw:     bridge br0, veth ends n0, n1 (the switch; no address)
    namespace P-node0:  lo, ib0 = 198.18.0.1/24 (veth to n0); host name node0 (set on entry)
    namespace P-node1:  lo, ib0 = 198.18.0.2/24 (veth to n1); host name node1

Every address is on a link this module creates, inside namespaces it creates: nothing is
added to the machine's own namespace, so rehearsals running side by side can use the same
addresses. ``/etc/netns/P-nodeI/hosts`` names every node (``enter.py`` mounts it as
``/etc/hosts`` on the node, as ``ip netns exec`` would), as a cluster's DNS would. Each
node's processes join a cgroup of the ``cpu`` controller (v2, or v1's ``cpu`` hierarchy)
when they enter the node: the cgroup lists them (to freeze, kill and reap the whole node,
whatever a launcher forks or daemonises) and its CPU quota slows the node.

``remove`` undoes everything in reverse and is safe to call twice or on a half-built
cluster; ``remove_stale`` removes what an earlier rehearsal left when it was killed with
SIGKILL (its process is gone; names carry its pid).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

NETWORK = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544: reserved for network benchmarking
SUBNET_PREFIX = 24
ETC_NETNS = Path("/etc/netns")
_NAME = re.compile(r"^vsr(\d+)-(sw|node\d+)$")


class ClusterError(RuntimeError):
    """The cluster cannot be built here; the message says what is missing."""


def _cpu_cgroup_root() -> tuple[Path, int] | None:
    """(where node cgroups go, cgroup version) for the cpu controller, or None."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.controllers").read_text().split():
        return v2 / "vitscale-rehearse", 2
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cgroup.procs").exists():
        return v1 / "vitscale-rehearse", 1
    return None


def check_can_run() -> None:
    """Refuse early, saying why, where a rehearsal cannot run."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise ClusterError("a rehearsal must run as root: it creates network namespaces, veth links "
                           "and cgroups (run it with sudo, or in a container started with --privileged)")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux"),
                          ("mount", "util-linux")):
        if shutil.which(tool) is None:
            raise ClusterError(f"a rehearsal needs '{tool}' on PATH (package {package})")
    if _cpu_cgroup_root() is None:
        raise ClusterError("a rehearsal needs the cgroup cpu controller (/sys/fs/cgroup with 'cpu' in "
                           "cgroup.controllers, or /sys/fs/cgroup/cpu) to track and slow each node's processes")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise ClusterError(f"'ip {' '.join(args)}' failed: {done.stderr.strip()}")
    return done


@dataclass
class Node:
    index: int
    host: str
    netns: str
    address: str
    switch_port: str  # the veth end on the bridge
    cgroup: Path


@dataclass
class Cluster:
    """A rehearsal cluster of ``nodes`` hosts; ``build()`` makes it, ``remove()`` undoes it."""

    nodes: int
    iface: str = "ib0"
    prefix: str = field(default_factory=lambda: f"vsr{os.getpid()}")
    members: list[Node] = field(default_factory=list)
    hosts_file: Path | None = None

    def __post_init__(self):
        if not 1 <= self.nodes <= 250:
            raise ClusterError(f"--nodes {self.nodes}: a rehearsal takes 1 to 250 nodes")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,14}", self.iface):
            raise ClusterError(f"--iface {self.iface!r} is not a valid interface name (a letter, then up to 14 "
                               "letters, digits, '_', '.', '-'; e.g. ib0)")
        root = _cpu_cgroup_root()
        self._cgroup_root, self._cgroup_version = root if root else (None, 0)
        subnet = next(NETWORK.subnets(new_prefix=SUBNET_PREFIX))
        addresses = list(subnet.hosts())
        self.members = [Node(i, f"node{i}", f"{self.prefix}-node{i}", str(addresses[i]), f"n{i}",
                             (self._cgroup_root or Path("/nonexistent")) / f"{self.prefix}-node{i}")
                        for i in range(self.nodes)]
        self.switch = f"{self.prefix}-sw"

    # -- building ------------------------------------------------------------------------
    def build(self, state_dir: Path) -> None:
        """Make the switch, the nodes, their links, hosts files and cgroups; write the cluster
        file that ``enter.py`` reads (``state_dir/cluster.json``)."""
        check_can_run()
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.address} {n.host}\n" for n in self.members)
        for n in self.members:
            _ip("netns", "add", n.netns)
            _ip("link", "add", self.iface, "netns", n.netns, "type", "veth", "peer", "name", n.switch_port,
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", n.switch_port, "master", "br0", "up")
            _ip("-n", n.netns, "addr", "add", f"{n.address}/{SUBNET_PREFIX}", "dev", self.iface)
            _ip("-n", n.netns, "link", "set", self.iface, "up")
            _ip("-n", n.netns, "link", "set", "lo", "up")
            (ETC_NETNS / n.netns).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / n.netns / "hosts").write_text(hosts)
            self._make_cgroup(n)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.hosts_file = state_dir / "cluster.json"
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"hosts": {key: {"netns": n.netns, "host": n.host,
                                                   "hosts": str(ETC_NETNS / n.netns / "hosts"),
                                                   "cgroup_procs": str(n.cgroup / "cgroup.procs")}
                                             for n in self.members for key in (n.host, n.address)}}))
        os.replace(tmp, self.hosts_file)

    def _make_cgroup(self, node: Node) -> None:
        if self._cgroup_version == 2:  # let children of our folder use the cpu controller
            parent = node.cgroup.parent
            parent.mkdir(exist_ok=True)
            for folder in (parent.parent, parent):
                try:
                    (folder / "cgroup.subtree_control").write_text("+cpu")
                except OSError as e:
                    raise ClusterError(f"cannot enable the cpu controller in {folder}: {e}") from e
        node.cgroup.mkdir(parents=True, exist_ok=True)

    def slow(self, index: int, factor: float, cores: float) -> None:
        """Cap node ``index`` at ``cores / factor`` CPUs (its ``cores`` ranks at 1/factor speed)."""
        cg, period = self.members[index].cgroup, 100_000
        quota = max(1000, int(period * cores / factor))
        if self._cgroup_version == 2:
            (cg / "cpu.max").write_text(f"{quota} {period}")
        else:
            (cg / "cpu.cfs_period_us").write_text(str(period))
            (cg / "cpu.cfs_quota_us").write_text(str(quota))

    # -- the nodes' processes --------------------------------------------------------------
    def pids(self, index: int) -> list[int]:
        try:
            text = (self.members[index].cgroup / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def signal(self, index: int, signum: int) -> int:
        """Send ``signum`` to every process of node ``index``; returns how many got it."""
        sent = 0
        for pid in self.pids(index):
            try:
                os.kill(pid, signum)
                sent += 1
            except ProcessLookupError:
                pass
        return sent

    def link_down(self, index: int) -> None:
        """Take node ``index`` off the network at the switch: its interface loses carrier, its
        processes live on, packets to and from it go nowhere (connections hang, as when a node
        vanishes)."""
        _ip("-n", self.switch, "link", "set", self.members[index].switch_port, "down")

    # -- removal -------------------------------------------------------------------------
    def remove(self, wait_s: float = 10.0) -> list[str]:
        """Kill every process of every node, then remove cgroups, namespaces (their links go with
        them) and hosts files. Returns what could not be removed (empty when all went)."""
        left: list[str] = []
        for i in range(len(self.members)):
            self.signal(i, signal.SIGKILL)  # a stopped (frozen) process dies of SIGKILL too
        deadline = time.monotonic() + wait_s
        for i, n in enumerate(self.members):
            while self.pids(i) and time.monotonic() < deadline:
                self.signal(i, signal.SIGKILL)
                time.sleep(0.05)
            if self.pids(i):
                left.append(f"processes {self.pids(i)} of {n.host}")
            try:
                if n.cgroup.exists():
                    n.cgroup.rmdir()
            except OSError as e:
                left.append(f"cgroup {n.cgroup} ({e})")
        if self._cgroup_root is not None:
            try:  # our parent folder, when no other rehearsal uses it
                self._cgroup_root.rmdir()
            except OSError:
                pass
        left += remove_namespaces([n.netns for n in self.members] + [self.switch])
        if self.hosts_file is not None:
            self.hosts_file.unlink(missing_ok=True)
        return left


def remove_namespaces(names: list[str]) -> list[str]:
    """Delete these namespaces (if present) and their ``/etc/netns`` folders."""
    present = set(list_namespaces())
    left = []
    for name in names:
        if name in present:
            done = _ip("netns", "delete", name, check=False)
            if done.returncode:
                left.append(f"namespace {name} ({done.stderr.strip()})")
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
    return left


def list_namespaces() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Remove the namespaces, hosts files and cgroups of rehearsals whose process is gone."""
    def dead(pid: int) -> bool:
        return not Path(f"/proc/{pid}").exists()

    stale = [n for n in list_namespaces() if (m := _NAME.match(n)) and dead(int(m.group(1)))]
    stale += [p.name for p in ETC_NETNS.glob("vsr*") if (m := _NAME.match(p.name)) and dead(int(m.group(1)))
              and p.name not in stale]
    root = _cpu_cgroup_root()
    removed = []
    for cg in sorted(root[0].glob("vsr*")) if root and root[0].is_dir() else []:
        if (m := _NAME.match(cg.name)) and dead(int(m.group(1))):
            for pid in (cg / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
            try:
                cg.rmdir()
                removed.append(f"cgroup {cg.name}")
            except OSError as e:
                logger.warning("could not remove cgroup %s: %s", cg, e)
    if root and root[0].is_dir():
        try:  # our parent folder, when no rehearsal uses it
            root[0].rmdir()
        except OSError:
            pass
    remove_namespaces(stale)
    return [f"namespace {n}" for n in stale] + removed
