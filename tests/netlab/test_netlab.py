"""The network lab: links from the topology, the router's queue arithmetic, the root check, and (as root, where
namespaces work) a gloo all-reduce across two namespaces over a delayed link, and teardown that leaves no
namespace, interface or process behind: after a clean exit, after Ctrl+C and after SIGKILL of the lab's owner."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geotrain.cli import main
from geotrain.config import load_config
from geotrain.errors import ConfigError
from geotrain.netlab import PREFIX, Lab, LabLink, LabTcp, clean_stale, config_lab_links, lab_links, router_warning
from geotrain.netlab.router import Conditions, _Pipe
from geotrain.topology import Link, Topology, parse_link

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_links_both_directions_from_the_topology():
    topo = Topology(3, default=parse_link("2mbit/50ms"), overrides={(2, 0): Link(100e6, 0.01)})
    links = lab_links(topo)
    assert sorted(links) == [(a, b) for a in range(3) for b in range(3) if a != b]
    assert links[(0, 1)] == links[(1, 0)]
    assert links[(0, 1)].bandwidth_bps == 2e6 and links[(0, 1)].latency_s == 0.05
    assert links[(0, 1)].queue_bytes == 64 * 1024  # the round trip's BDP (25 KB) is below the floor
    assert links[(2, 0)].bandwidth_bps == 100e6 and links[(0, 2)].latency_s == 0.01
    assert links[(0, 2)].queue_bytes == int(2 * 0.01 * 100e6 / 8)  # 250 KB: one round trip in flight
    assert lab_links(topo, queue_bytes=10_000, loss=0.01)[(1, 2)].queue_bytes == 10_000


def test_links_past_what_the_router_forwards_are_warned_of():
    four = lab_links(Topology(4, default=parse_link("100mbit/10ms")))  # 12 directions of 100 Mbit/s
    assert "1,200 Mbit/s" in router_warning(four, "python") and "one Python process" in router_warning(four, "python")
    assert router_warning(four, "c") is None  # C forwards 1,458 Mbit/s
    assert "forward.c" in router_warning(lab_links(Topology(4, default=parse_link("1gbit/10ms"))), "c")
    assert router_warning(lab_links(Topology(4, default=parse_link("10mbit/10ms"))), "python") is None  # 120 Mbit/s
    assert router_warning(lab_links(Topology(2, default=None)), "python") is None  # unshaped pairs are not counted


def test_a_pair_sets_its_own_loss_and_queue_in_the_run_file():
    config = load_config(values={"run.sites": 3, "wan.link": "2mbit/50ms", "wan.links": [
        {"between": [2, 0], "link": "100mbit/10ms", "loss": 0.01, "queue": "32kb"},
        {"between": [1, 2], "link": "10mbit/20ms"}]})
    links = config_lab_links(config)
    assert links[(0, 2)] == links[(2, 0)] == LabLink(100e6, 0.01, 0.01, 32 * 1024)
    assert links[(1, 2)] == LabLink(10e6, 0.02, 0.0, 64 * 1024)  # neither set: the lab's own
    assert links[(0, 1)] == LabLink(2e6, 0.05, 0.0, 64 * 1024)
    # the command line's --loss and --queue hold wherever a pair sets nothing of its own
    other = config_lab_links(config, queue_bytes=20_000, loss=0.02)
    assert other[(0, 1)] == LabLink(2e6, 0.05, 0.02, 20_000) and other[(0, 2)] == links[(0, 2)]
    for bad, match in ((1.0, "below 1"), (-0.1, "must lie in")):
        with pytest.raises(ConfigError, match=match):
            load_config(values={"run.sites": 2, "wan.links": [{"between": [0, 1], "link": "2mbit/5ms", "loss": bad}]})
    with pytest.raises(ConfigError, match="as a size"):
        load_config(values={"run.sites": 2, "wan.links": [{"between": [0, 1], "link": "2mbit/5ms", "queue": "big"}]})
    with pytest.raises(ConfigError, match="cannot hold one packet"):
        config_lab_links(load_config(values={"run.sites": 2, "wan.links": [
            {"between": [0, 1], "link": "2mbit/5ms", "queue": 100}]}))


def test_pipe_serialises_delays_and_drops_tail():
    rng = random.Random(0)
    pipe = _Pipe(bandwidth_bps=8000.0, latency_s=0.05, loss=0.0, queue_bytes=2500)  # 1000 bytes/s
    assert pipe.admit(10.0, 1000, rng) == pytest.approx(11.05)  # 1 s on the wire, then 50 ms of propagation
    assert pipe.admit(10.0, 1000, rng) == pytest.approx(12.05)  # queued behind the first
    assert pipe.admit(10.0, 1000, rng) is None  # 2000 bytes queued + 1000 > 2500: tail drop
    assert pipe.admit(11.5, 1000, rng) == pytest.approx(13.05)  # 500 bytes left in the queue: room again
    assert (pipe.packets, pipe.bytes, pipe.dropped) == (3, 3000, 1)


def test_conditions_cut_and_slow_both_directions_of_a_sites_links():
    pipes = {(a, b): _Pipe(bandwidth_bps=1e6, latency_s=0.0, loss=0.0, queue_bytes=1 << 20, nominal_bps=1e6)
             for a in range(3) for b in range(3) if a != b}
    c = Conditions(cut=set(), slow={})
    c.apply("partition 1", pipes)
    assert {k for k, p in pipes.items() if p.cut} == {(0, 1), (1, 0), (1, 2), (2, 1)}
    assert pipes[(1, 0)].admit(0.0, 100, random.Random(0)) is None
    c.apply("slow 2 4", pipes)
    c.apply("slow 0 2.0", pipes)
    assert pipes[(0, 2)].bandwidth_bps == pipes[(2, 1)].bandwidth_bps == 0.25e6  # the larger factor of the ends
    assert pipes[(0, 1)].bandwidth_bps == 0.5e6
    c.apply("heal 1", pipes)
    c.apply("slow 2 1", pipes)
    assert not any(p.cut for p in pipes.values())
    assert pipes[(1, 2)].bandwidth_bps == 1e6 and pipes[(0, 2)].bandwidth_bps == 0.5e6
    for bad in ("slow 0 0.5", "slow 0", "cut 1", "partition", "heal one"):
        with pytest.raises(ValueError):
            c.apply(bad, pipes)


@functools.cache
def _forwarder() -> str | None:
    """The compiled C data plane, or None where no C compiler builds it."""
    from geotrain.netlab.cforward import ForwarderUnavailable, build

    try:
        return str(build())
    except ForwarderUnavailable:
        return None


@pytest.mark.skipif("_forwarder() is None", reason="needs a C compiler")
def test_the_c_forwarder_delivers_and_drops_exactly_as_the_python_router():
    """forward.c's links against router.py's, the reference: 3000 packets offered at random times and sizes
    to a 2 Mbit/s link with a 64 KB queue, with partitions, heals and slow factors (good and bad) among them.
    Every delivery time must be the same double, every drop the same drop."""
    rng = random.Random(7)
    bw, latency, queue = 2e6, 0.05, 64 * 1024
    lines, t = [], 100.0
    for _ in range(3000):
        t += rng.expovariate(1 / 0.005)
        if rng.random() < 0.01:
            lines.append(rng.choice(["partition 1", "heal 1", "slow 1 2.5", "slow 0 1", "slow 1 1", "slow 0 0.5",
                                     "cut 1", "slow 7 2"]))
        else:
            lines.append(f"offer {t!r} {rng.randint(40, 1500)}")
    done = subprocess.run([_forwarder(), "--replay", repr(bw), repr(latency), str(queue)], input="\n".join(lines),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = done.stdout.splitlines()
    pipes = {(a, 1 - a): _Pipe(bw, latency, 0.0, queue, nominal_bps=bw) for a in range(2)}
    conditions, expected = Conditions(cut=set(), slow={}), []
    for line in lines:
        if line.startswith("offer"):
            _, now, size = line.split()
            at = pipes[(0, 1)].admit(float(now), int(size), rng)
            expected.append("drop" if at is None else at)
        elif line == "slow 7 2":  # a site the lab does not have: the lab refuses it before the router sees it
            expected.append("error")
        else:
            try:
                conditions.apply(line, pipes)
                expected.append("ok")
            except ValueError:
                expected.append("error")
    got = [x if x in ("drop", "ok") else "error" if x.startswith("error:") else float(x) for x in got]
    assert got == expected
    assert 100 < expected.count("drop") < 2900  # the queue overflowed and drained: both paths were exercised


@pytest.mark.skipif("_forwarder() is None", reason="needs a C compiler")
def test_the_forwarder_is_kept_only_where_no_one_else_can_replace_it(tmp_path):
    from geotrain.netlab.cforward import ForwarderUnavailable, build

    kept = tmp_path / "kept"
    binary = build(kept)
    assert binary.parent == kept and kept.stat().st_mode & 0o777 == 0o700 and build(kept) == binary  # built once
    binary.chmod(0o777)  # writable by anyone: built afresh, not run
    assert build(kept) == binary and binary.stat().st_mode & 0o777 == 0o755
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ForwarderUnavailable, match="not this user's alone"):
        build(shared)


def test_a_lab_that_must_forward_in_c_without_a_compiler_is_bad_input(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    lab = Lab(sites=2, links=lab_links(Topology(2, default=parse_link("10mbit/10ms"))), forwarder="c")
    with pytest.raises(ConfigError, match="no C compiler"):
        lab._forwarder_binary()
    lab = Lab(sites=2, links=lab.links)  # auto: falls back to Python, and says why
    assert lab._forwarder_binary() is None and lab.forwarder_used == "python"
    assert "no C compiler" in lab.forwarder_note
    with pytest.raises(ConfigError, match="one of auto, c, python"):
        Lab(sites=2, links=lab.links, forwarder="rust")


def test_tcp_settings_parse_and_bad_ones_are_bad_input(monkeypatch):
    assert LabTcp.parse("host") == LabTcp()
    assert LabTcp.parse("cubic,no-idle-restart") == LabTcp("cubic", False)
    assert LabTcp.parse("idle-restart, bbr") == LabTcp("bbr", True)
    assert LabTcp.parse("no-idle-restart") == LabTcp(None, False)
    for bad, says in [("cubic,bbr", "'bbr'"), ("idle-restart,no-idle-restart", "once"), ("Cubic", "'Cubic'"),
                      ("", "''")]:
        with pytest.raises(ConfigError, match=says):
            LabTcp.parse(bad)
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
    if available.exists():
        with pytest.raises(ConfigError, match="no 'nosuchcc' congestion control; it has"):
            LabTcp("nosuchcc").check()
        LabTcp(available.read_text().split()[0]).check()
    assert LabTcp("cubic", False).describe() == "cubic, slow start after idle off"
    assert LabTcp("bbr", False).describe() == "bbr, slow start after idle off, which BBR does not use"
    assert LabTcp().describe().endswith("(the host's), slow start after idle on (the kernel's default)")


@pytest.mark.parametrize("flag", [["--tcp", "cubic"], ["--router", "c"]])
def test_lab_flags_without_the_lab_are_bad_input(flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--sites", "2", "--quiet", *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]}: sets up the network lab; add --network netlab" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.parametrize("argv", [["netlab", "--sites", "2", "--", "true"],
                                  ["run", "--network", "netlab", "--sites", "2", "--quiet"]])
def test_not_root_is_bad_input(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "Traceback" not in err


# -- as root, in real namespaces --------------------------------------------------------------------------


@functools.cache
def _lab_unavailable() -> str | None:
    """Why this machine cannot build a lab (None when it can): not root, no TUN, or no namespaces."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    probe = f"{PREFIX}{os.getpid()}s63"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return "needs iproute2"
    if not made:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def needs_lab(test):
    """Skipped without root and network namespaces; marked slow, as every test that starts processes is."""
    return pytest.mark.slow(pytest.mark.skipif("_lab_unavailable() is not None",
                                               reason="needs root and network namespaces")(test))


def _leftovers(owner: int) -> list[str]:
    """Namespaces, interfaces and state files of the lab owned by ``owner`` that still exist."""
    tag = f"{PREFIX}{owner}"
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
    out += subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout.split()
    found = [w.rstrip(":").split("@")[0] for w in out if w.startswith(tag)]
    found += [str(p) for p in Path("/run/geotrain-netlab").glob(f"{owner}.*")]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


_ALL_REDUCE = r"""
import json, os, statistics, time
import torch, torch.distributed as dist
torch.set_num_threads(1)
k, n = int(os.environ["NETLAB_SITE"]), int(os.environ["NETLAB_SITES"])
host = os.environ["NETLAB_ADDRESSES"].split(",")[0]
dist.init_process_group("gloo", init_method=f"tcp://{host}:29555", rank=k, world_size=n)
x = torch.full((16_384,), float(k + 1))  # 64 KB
times = []
for _ in range(3):
    y = x.clone()
    dist.barrier()
    t = time.perf_counter()
    dist.all_reduce(y)
    times.append(time.perf_counter() - t)
print(json.dumps({"site": k, "sum": float(y[0]), "median": statistics.median(times)}), flush=True)
dist.destroy_process_group()
"""


def _forwarders():
    """Both data planes where C builds; marks C's case skipped where it does not."""
    return ["python", pytest.param("c", marks=pytest.mark.skipif("_forwarder() is None",
                                                                 reason="needs a C compiler"))]


@needs_lab
@pytest.mark.parametrize("forwarder", _forwarders())
def test_all_reduce_across_namespaces_pays_the_links_latency_and_leaves_nothing(forwarder):
    latency = 0.03
    topo = Topology(2, default=parse_link(f"20mbit/{latency * 1000:g}ms"))
    lab = Lab(sites=2, links=lab_links(topo), forwarder=forwarder)
    try:
        with lab:
            # the control address is reachable from a site, unshaped, as the coordinator is
            with socket.create_server((lab.control_address, 0)) as server:
                port = server.getsockname()[1]
                probe = lab.popen(1, [sys.executable, "-c", "import socket,sys; socket.create_connection("
                                      f"({lab.control_address!r}, {port}), timeout=10).sendall(b'hi')"])
                server.settimeout(20)
                conn, _ = server.accept()
                with conn:
                    assert conn.recv(2) == b"hi"
                assert probe.wait(timeout=20) == 0
            env = {**os.environ, "PYTHONPATH": SRC}
            procs = [lab.popen(k, [sys.executable, "-c", _ALL_REDUCE], env=env, stdout=subprocess.PIPE, text=True)
                     for k in range(2)]
            results = [json.loads(p.communicate(timeout=90)[0].strip().splitlines()[-1]) for p in procs]
            assert [p.returncode for p in procs] == [0, 0]
    finally:
        lab.close()
    assert all(r["sum"] == 3.0 for r in results)
    # Physics, not a timing target: each packet waits `latency` in the router, and a ring all-reduce needs at
    # least one exchange each way. The upper bound only catches a hang.
    for r in results:
        assert 2 * latency <= r["median"] < 30.0
    forwarded = lab.stats["0->1"]["bytes"] + lab.stats["1->0"]["bytes"]
    assert forwarded > 2 * 64 * 1024  # the payloads crossed the router, headers and all
    assert _leftovers(lab.owner) == []
    assert not _alive(lab.router.pid)
    assert lab.forwarder_used == forwarder


_CONNECTED_CC = r"""
import socket, subprocess, sys
peer, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((peer, port), timeout=20) as c:
    print(subprocess.run(["ss", "-tin", "dst", peer], capture_output=True, text=True, timeout=20).stdout, flush=True)
"""


@needs_lab
def test_the_sites_tcp_settings_act_on_their_connections_and_leave_the_host_alone():
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
        available = f.read().split()
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        host = f.read().strip()
    other = next((cc for cc in ("cubic", "reno", *available) if cc in available and cc != host), None)
    if other is None:
        pytest.skip("the kernel has only one congestion control")
    with open("/proc/sys/net/ipv4/tcp_slow_start_after_idle") as f:
        host_restart = f.read().strip()
    lab = Lab(sites=2, links=lab_links(Topology(2, default=parse_link("100mbit/1ms"))), tcp=LabTcp(other, False))
    with lab:
        server = lab.popen(1, [sys.executable, "-c", "import socket, sys; s = socket.create_server((sys.argv[1], 0)); "
                               "print(s.getsockname()[1], flush=True); c = s.accept()[0]; c.recv(1)",
                               lab.wan_address(1)], stdout=subprocess.PIPE, text=True)
        port = server.stdout.readline().strip()
        client = lab.popen(0, [sys.executable, "-c", _CONNECTED_CC, lab.wan_address(1), port], stdout=subprocess.PIPE,
                           text=True)
        seen = client.communicate(timeout=30)[0]
        restart = lab.popen(0, [sys.executable, "-c", "print(open('/proc/sys/net/ipv4/tcp_slow_start_after_idle')"
                                ".read().strip())"], stdout=subprocess.PIPE, text=True).communicate(timeout=30)[0]
    assert f" {other} " in seen and f" {host} " not in seen, seen  # the connection between sites runs it
    assert restart.strip() == "0"
    with open("/proc/sys/net/ipv4/tcp_slow_start_after_idle") as f:
        assert f.read().strip() == host_restart  # the host's own setting is untouched
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        assert f.read().strip() == host


_BLAST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent = 0
for _ in range(int(sys.argv[2])):
    try:
        s.sendto(b"x" * 64, (sys.argv[1], 9))
        sent += 1
    except BlockingIOError:
        pass
print(sent, flush=True)
"""


@needs_lab
def test_a_sites_own_device_queues_a_burst_the_kernels_default_would_drop_and_counts_what_it_drops():
    """The link's queue at the router is the lab's only bottleneck queue: a site's WAN device holds
    DEVICE_QUEUE_PACKETS (not the kernel's 500) and what it drops beyond them is counted. The router is
    stopped while the site sends, so the burst waits in the device."""
    from geotrain.netlab.lab import DEVICE_QUEUE_PACKETS

    lab = Lab(sites=2, links=lab_links(Topology(2, default=parse_link("100mbit/1ms"))))
    burst = DEVICE_QUEUE_PACKETS + 5000
    with lab:
        queues = [json.loads(subprocess.run(["ip", "-n", lab.namespace(k), "-j", "link", "show", "wan0"],
                                            capture_output=True, text=True, timeout=10).stdout)[0]["txqlen"]
                  for k in range(2)]
        os.kill(lab.router.pid, signal.SIGSTOP)
        try:
            blast = lab.popen(0, [sys.executable, "-c", _BLAST, lab.wan_address(1), str(burst)],
                              stdout=subprocess.PIPE, text=True)
            sent = int(blast.communicate(timeout=60)[0])
        finally:
            os.kill(lab.router.pid, signal.SIGCONT)
    assert queues == [DEVICE_QUEUE_PACKETS] * 2
    assert sent == burst
    # The device held a full queue (less a few slots, which may hold the kernel's own packets), 40 times the
    # kernel's default; what did not fit was counted, and only at site 0.
    assert DEVICE_QUEUE_PACKETS - 8 <= burst - lab.device_drops[0] <= DEVICE_QUEUE_PACKETS
    assert lab.device_drops[1] == 0


@needs_lab
def test_geotrain_netlab_says_what_the_links_carried_and_dropped(capsys):
    send = ("import os, socket; k = int(os.environ['NETLAB_SITE']); peer = os.environ['NETLAB_ADDRESSES'].split(',')"
            "[1 - k]; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); [s.sendto(b'x' * 1000, (peer, 9)) "
            "for _ in range(5)]")
    assert main(["netlab", "--sites", "2", "--link", "10mbit/5ms", "--", sys.executable, "-c", send]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("the lab's links carried"))
    carried = int(line.split()[4].replace(",", ""))
    assert carried >= 10  # both sites' five datagrams crossed the router (with whatever else the kernels sent)
    assert line.endswith("dropped 0 at their queues; the sites' own devices dropped 0")


_PROBE = r"""
import socket, sys
for line in sys.stdin:  # "HOST PORT TIMEOUT": can this site open a connection there within TIMEOUT seconds?
    host, port, timeout = line.split()
    try:
        socket.create_connection((host, int(port)), timeout=float(timeout)).close()
        print("yes", flush=True)
    except OSError:
        print("no", flush=True)
"""


@needs_lab
@pytest.mark.parametrize("forwarder", _forwarders())
def test_partition_and_heal_act_on_the_real_links(forwarder):
    topo = Topology(2, default=parse_link("100mbit/1ms"))
    lab = Lab(sites=2, links=lab_links(topo), forwarder=forwarder)
    with lab, socket.create_server((lab.control_address, 0)) as control:
        peer = lab.popen(1, [sys.executable, "-c", "import socket, sys; s = socket.create_server((sys.argv[1], 0)); "
                             "print(s.getsockname()[1], flush=True); [s.accept()[0].close() for _ in range(9)]",
                             lab.wan_address(1)], stdout=subprocess.PIPE, text=True)
        wan_port = int(peer.stdout.readline())
        control_port = control.getsockname()[1]
        control.listen(16)
        probe = lab.popen(0, [sys.executable, "-c", _PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def reaches(address: str, port: int, timeout: float = 10.0) -> bool:
            probe.stdin.write(f"{address} {port} {timeout}\n")
            probe.stdin.flush()
            return probe.stdout.readline().strip() == "yes"

        assert reaches(lab.wan_address(1), wan_port) and reaches(lab.control_address, control_port)
        lab.partition(0)
        assert not reaches(lab.wan_address(1), wan_port, timeout=0.7)
        assert not reaches(lab.control_address, control_port, timeout=0.7)  # cut off from the coordinator too
        lab.heal(0)
        assert reaches(lab.wan_address(1), wan_port) and reaches(lab.control_address, control_port)
        lab.slow(1, 10.0)  # taken by the router; its effect on time is the benchmark's to measure
        with pytest.raises(ValueError):
            lab.slow(5, 2.0)
    assert lab.stats["0->1"]["dropped"] >= 1  # the partitioned connection attempt's packets


def _start_lab_command(tmp_path: Path) -> tuple[subprocess.Popen, list[int], dict]:
    """``geotrain netlab`` running a sleeper per site; returns it, the sleepers' PIDs and its state file."""
    script = f"import os, time; open({str(tmp_path)!r} + f'/site{{os.environ[\"NETLAB_SITE\"]}}', 'w')" \
             ".write(str(os.getpid())); time.sleep(120)"
    env = {**os.environ, "PYTHONPATH": SRC}
    owner = subprocess.Popen([sys.executable, "-m", "geotrain.cli", "netlab", "--sites", "2", "--link", "10mbit/5ms",
                              "--", sys.executable, "-c", script], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             # a shell ignores SIGINT in its background jobs and children inherit that
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    files = [tmp_path / f"site{k}" for k in range(2)]
    if not _wait_until(lambda: all(f.exists() and f.read_text() for f in files), 60):
        owner.kill()
        raise AssertionError(f"the lab did not start: {owner.communicate(timeout=30)[1].decode()}")
    state = json.loads((Path("/run/geotrain-netlab") / f"{owner.pid}.json").read_text())
    return owner, [int(f.read_text()) for f in files], state


@needs_lab
@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_teardown_leaves_nothing(how, tmp_path):
    owner, sleepers, state = _start_lab_command(tmp_path)
    try:
        assert all(_alive(pid) for pid in [*sleepers, state["router_pid"]])
        assert len(_leftovers(owner.pid)) >= 5  # two namespaces, two host interfaces, the state file
        if how == "ctrl-c":
            os.kill(owner.pid, signal.SIGINT)
            assert owner.wait(timeout=60) == 1
        else:
            os.kill(owner.pid, signal.SIGKILL)
            owner.wait(timeout=30)
            # without its owner, the router stops by itself and the sites' commands die with their parent
            assert _wait_until(lambda: not any(_alive(p) for p in [*sleepers, state["router_pid"]]), 30)
            assert owner.pid in clean_stale()  # what the next lab does first
        assert _leftovers(owner.pid) == []
        assert not any(_alive(p) for p in [*sleepers, state["router_pid"]])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        for pid in sleepers:
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        clean_stale()


@needs_lab
@pytest.mark.timeout(300)
def test_a_site_cut_off_on_the_real_links_for_10_s_is_dropped_and_healed_back_in(tmp_path):
    """Issue C of the lab: ``partition`` cuts site 1's real links (and its path to the coordinator) 3 s into
    training and ``heal`` restores them 10 s later. The coordinator drops it when its heartbeats stop, site 0
    trains on, site 1 finds itself dropped, joins again over the real links and is healed; the run ends with
    exit 0, both sites holding one model. Steps take at least 50 ms, so the 450-step run outlasts the fault."""
    from _utils.runs import tiny_config
    from _utils.workloads import floored_workload
    from geotrain.faults import parse_fault
    from geotrain.train.launch import launch

    config = tiny_config(tmp_path / "run", **{
        "run.sites": 2, "wan.link": "100mbit/5ms", "outer.sync_every": 20, "run.tokens": 2 * 4 * 32 * 450,
        "membership.heartbeat_s": 0.2, "membership.heartbeat_timeout_s": 5.0, "checkpoint.every_rounds": 0})
    faults = [parse_fault("partition:1@3s"), parse_fault("heal:1@13s")]
    with Lab(sites=2, links=lab_links(config.topology())) as lab:
        outcome = launch(config, workload_factory=floored_workload, factory_kwargs={"floor_s": 0.05},
                         progress=False, faults=faults, lab=lab)
    s = outcome.summary
    assert outcome.exit_code == 0 and s["ok"] is True, s.get("error")
    left = [e for e in s["membership"] if e["kind"] == "left"]
    assert [e["site"] for e in left] == [1] and "no heartbeat" in left[0]["reason"]
    assert [e["site"] for e in s["membership"] if e["kind"] == "healed"] == [1]
    assert s["sites_in_sync"] is True
    assert _leftovers(os.getpid()) == []
