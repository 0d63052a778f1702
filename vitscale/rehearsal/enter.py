"""Run a command on a rehearsal node, as ``ssh HOST COMMAND`` would on a cluster.

    python -m vitscale.rehearsal.enter [ssh options] HOST COMMAND...

Reads the cluster file named by ``VITSCALE_REHEARSAL_HOSTS`` (written by ``cluster.py``),
joins the node's cgroup, enters its network namespace, a mount namespace where the node's
hosts file is ``/etc/hosts`` and a UTS namespace with the node's host name, and runs
COMMAND there through ``sh -c`` (the words joined by spaces, as ssh does). It takes the
options launchers give ssh and ignores them, so it serves as MPICH Hydra's
``-launcher-exec`` (``HYDRA_LAUNCHER_EXEC``), a remote shell for anything that calls
``ssh HOST ...``, and the way ``vitscale-rehearse`` starts each node's launcher itself.

Imports only the standard library: it runs once per node start, before anything else.
"""
from __future__ import annotations

import json
import os
import sys

HOSTS_ENV = "VITSCALE_REHEARSAL_HOSTS"
_SSH_FLAGS_WITH_VALUE = set("bcDEeFIiJLlmOoPpQRSWw")  # ssh(1) options that take an argument


def split_ssh_args(argv: list[str]) -> tuple[str, str]:
    """(host, command) from ssh-style arguments: options first, then HOST, then the command."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        flag = argv[i][1:]
        i += 2 if (len(flag) == 1 and flag in _SSH_FLAGS_WITH_VALUE) else 1
    if i < len(argv) and argv[i] == "--":
        i += 1
    if i >= len(argv):
        raise SystemExit("usage: python -m vitscale.rehearsal.enter [ssh options] HOST COMMAND...")
    host = argv[i].split("@")[-1]  # user@host
    return host, " ".join(argv[i + 1:])


def main(argv: list[str] | None = None) -> None:
    host, command = split_ssh_args(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(HOSTS_ENV)
    if not path:
        raise SystemExit(f"{HOSTS_ENV} is not set: run this under vitscale-rehearse")
    with open(path) as f:
        nodes = json.load(f)["hosts"]
    if host not in nodes:
        raise SystemExit(f"no rehearsal node '{host}' (the cluster has {', '.join(sorted(nodes))})")
    node = nodes[host]
    with open(node["cgroup_procs"], "w") as f:  # before exec: every process the command forks is in it
        f.write(str(os.getpid()))
    # The node's network namespace (nsenter, not `ip netns exec`: that remounts /sys, which hides
    # the cgroup file system from a launcher on the node that starts processes on other nodes),
    # a mount namespace of its own with the node's hosts file as /etc/hosts (what `ip netns exec`
    # would do), a UTS namespace with the node's host name; then the command, as ssh runs it.
    os.execvp("nsenter", ["nsenter", f"--net=/run/netns/{node['netns']}", "--", "unshare", "--uts", "--mount",
                          "--propagation", "private", "--", "sh", "-c",
                          'mount --bind "$2" /etc/hosts && hostname "$0" && exec sh -c "$1"',
                          node["host"], command or "true", node["hosts"]])


if __name__ == "__main__":
    main()
