"""The rehearsal cluster without a job: namespaces, host names, addresses, links, clean-up."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from vitscale.rehearsal import cluster as cl
from vitscale.rehearsal.enter import split_ssh_args
from vitscale.rehearsal.faults import FaultError, parse_fail, parse_slow

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")


def _ours(prefix: str) -> dict:
    """Everything on the machine that carries a rehearsal's prefix."""
    root = cl._cpu_cgroup_root()
    return {"netns": [n for n in cl.list_namespaces() if n.startswith(prefix)],
            "etc": [p.name for p in cl.ETC_NETNS.glob(prefix + "*")],
            "cgroups": [p.name for p in root[0].glob(prefix + "*")] if root and root[0].is_dir() else []}


def _on(node: str, hosts_file: Path, command: str) -> str:
    env = {**os.environ, "VITSCALE_REHEARSAL_HOSTS": str(hosts_file)}
    return subprocess.run([sys.executable, "-m", "vitscale.rehearsal.enter", "-x", node, command], env=env,
                          capture_output=True, text=True, timeout=30, check=True).stdout


def test_ssh_style_arguments_as_hydra_and_deepspeed_give_them():
    # what MPICH's Hydra passes its launcher: options, the host, the proxy's command line
    assert split_ssh_args(["-x", "node1", '"/v/hydra_pmi_proxy"', "--control-port", "198.18.0.1:3"]) == \
        ("node1", '"/v/hydra_pmi_proxy" --control-port 198.18.0.1:3')
    assert split_ssh_args(["-o", "StrictHostKeyChecking=no", "-p", "22", "root@node0", "hostname"]) == \
        ("node0", "hostname")


def test_fault_specs_are_checked_before_anything_starts():
    assert parse_fail("1:8:link", 2) == parse_fail("1:8:link", 2)
    assert parse_slow("1:3", 2).factor == 3
    for bad in ("1:8", "2:8:link", "1:8:melt", "x:8:kill"):
        with pytest.raises(FaultError, match="fail-node"):
            parse_fail(bad, 2)
    for bad in ("1", "1:0.5", "5:2"):
        with pytest.raises(FaultError, match="slow-node"):
            parse_slow(bad, 2)


def test_refuses_without_root_or_ip(monkeypatch, caplog):
    from vitscale.tools.rehearse import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main([TINY, "run.dir=/tmp/none"]) == 2
    assert "must run as root" in caplog.text
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main([TINY, "run.dir=/tmp/none"]) == 2
    assert "needs 'ip' on PATH" in caplog.text


@needs_root
def test_nodes_have_their_names_addresses_and_links_and_all_goes_away(tmp_path):
    c = cl.Cluster(2, iface="ib0", prefix=f"vsr{os.getpid()}t")
    try:
        c.build(tmp_path)
        hosts = c.hosts_file
        # each node: its own host name, ib0 with its own address, the other node by name
        assert _on("node1", hosts, "hostname").strip() == "node1"
        assert "198.18.0.2/24" in _on("node1", hosts, "ip -o -4 addr show dev ib0")
        assert _on("node0", hosts, "getent hosts node1").split()[0] == "198.18.0.2"
        # the machine's own namespace got no address in the range, and no interface named ib0
        own = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        assert "198.18." not in own and " ib0 " not in own
        # a TCP connection between the nodes, over the bridge
        probe = ("python3 -c \"import socket,sys; s=socket.create_connection(('node0', 22345), timeout=2)\"")
        listener = subprocess.Popen([sys.executable, "-m", "vitscale.rehearsal.enter", "node0",
                                     "python3 -c \"import socket; s=socket.socket(); s.bind(('0.0.0.0', 22345)); "
                                     "s.listen(); c,_=s.accept(); print('accepted', c.getpeername()[0])\""],
                                    env={**os.environ, "VITSCALE_REHEARSAL_HOSTS": str(hosts)},
                                    stdout=subprocess.PIPE, text=True)
        for _ in range(50):
            if subprocess.run([sys.executable, "-m", "vitscale.rehearsal.enter", "node1", probe],
                              env={**os.environ, "VITSCALE_REHEARSAL_HOSTS": str(hosts)},
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        assert listener.communicate(timeout=20)[0].strip() == "accepted 198.18.0.2"
        # the node's processes are in its cgroup, so a fault reaches all of them
        sleeper = subprocess.Popen([sys.executable, "-m", "vitscale.rehearsal.enter", "node1", "sleep 60 & sleep 60"],
                                   env={**os.environ, "VITSCALE_REHEARSAL_HOSTS": str(hosts)})
        for _ in range(50):
            if len(c.pids(1)) >= 2:
                break
            time.sleep(0.1)
        assert len(c.pids(1)) >= 2 and c.pids(0) == []
        # link down: node1 can no longer reach node0
        c.link_down(1)
        cut = subprocess.run([sys.executable, "-m", "vitscale.rehearsal.enter", "node1", probe],
                             env={**os.environ, "VITSCALE_REHEARSAL_HOSTS": str(hosts)}, capture_output=True)
        assert cut.returncode != 0
    finally:
        left = c.remove()
    assert left == []
    assert sleeper.wait(timeout=10) != 0  # killed by the removal
    assert _ours(c.prefix) == {"netns": [], "etc": [], "cgroups": []}


@needs_root
def test_ctrl_c_and_a_killed_rehearsal_leave_nothing(tmp_path):
    """Ctrl-C while the job starts removes everything; after SIGKILL, --clean does."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "vitscale.tools.rehearse", "--nodes", "2", TINY, "train.steps=1000",
           "log.progress=false"]
    for how in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen([*cmd, f"run.dir={tmp_path / how.name}"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        prefix = f"vsr{proc.pid}-"
        for line in proc.stdout:  # the cluster is up and the launchers started
            if line.startswith("rehearsal: 2 nodes"):
                break
        time.sleep(1.0)
        assert _ours(prefix)["netns"], "the cluster was not built"
        proc.send_signal(how)
        out = proc.communicate(timeout=60)[0]
        if how == signal.SIGINT:
            assert proc.returncode == 130 and "removed 3 namespaces" in out, out[-2000:]
        else:
            assert _ours(prefix)["netns"], "SIGKILL cannot clean up: something should be left for --clean"
            done = subprocess.run([sys.executable, "-m", "vitscale.tools.rehearse", "--clean"], capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0 and f"{prefix}node0" in done.stderr, done.stderr
        assert _ours(prefix) == {"netns": [], "etc": [], "cgroups": []}
