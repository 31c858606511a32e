"""A network lab on one machine: one Linux network namespace per site, joined by a router that applies the
run's links for real, so the run's gloo traffic crosses a network with the configured bandwidth and latency.

Layout of a lab owned by process ``P`` (every name carries ``gtl`` and ``P``, so a stale lab is found and only
ours is cleaned)::

    namespace gtlPsK (site K)                           host namespace
      wan0  10.77.0.(K+1)/24  TUN  <- router process ->  (holds every site's wan0; applies link K->J)
      ctl0  CTL.(K+2) peer CTL.1  veth <-------------->  gtlPcK  CTL.1 peer CTL.(K+2)   coordinator on CTL.1
      lo    up

* **Data plane**: ``wan0`` is a TUN device created by the router (``geotrain.netlab.router``), which reads
  every packet a site sends to another site's address and delivers it after the directed link's queue,
  serialisation and latency. gloo is told to use it (``GLOO_SOCKET_IFNAME=wan0``); traffic between the workers
  of one site stays inside its namespace.
* **Control plane**: a veth pair per site joins the site to the host namespace, where the run's coordinator
  listens on the lab's control address CTL.1 (``10.78.N.1``, N the first subnet no interface uses). The
  emulator does not charge the coordinator's messages either (heartbeats, votes, the store gloo meets on), so
  they are not shaped here: the lab and the emulator then differ only in how the sites' payloads travel. A
  site reaches nothing but the control address over ``ctl0`` (a host route, no default route).
* **Faults on the real links**: ``partition(k)`` makes the router drop every packet to or from site ``k`` and
  takes its control link down; ``heal(k)`` undoes it; ``slow(k, factor)`` divides the rate of ``k``'s links.
  ``geotrain run --network netlab --fault`` carries out its partition, heal and slow with them.
* **TCP** (``LabTcp``, ``--tcp``): the sites' congestion control (on their WAN route) and whether a connection
  idle past its retransmission timeout restarts from a small window (the namespace's
  ``net.ipv4.tcp_slow_start_after_idle``). Unset, the kernel's defaults: the host's congestion control, restart
  on. A small sync's time depends on them (the README's lab section has the figures).
* **Teardown** (``Lab.close``, also from ``__exit__`` on Ctrl+C or an exception): the commands started in the
  lab, the router, every process left in a namespace, the namespaces (which takes their interfaces, and the
  host ends of the veths, with them), the state file. A lab whose owner was SIGKILLed loses its router (it
  watches its owner) and its processes (they die with their parent where started by the lab); its namespaces
  are removed by :func:`clean_stale`, which every new lab runs first and ``geotrain netlab --clean`` runs alone.

Root only (``require_root`` raises ConfigError, exit code 2, otherwise).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotrain.errors import ConfigError
from geotrain.netlab.ns import setns as _setns
from geotrain.topology import MAX_BANDWIDTH, Topology

__all__ = ["DEFAULT_MTU", "Lab", "LabLink", "LabTcp", "PREFIX", "ROUTER_MEASURED_BPS", "clean_stale",
           "config_lab_links", "enter_namespace", "lab_links", "require_root", "router_warning", "stale_labs"]

PREFIX = "gtl"
"""Start of every namespace and interface name a lab creates, followed by the owner's PID."""
STATE_DIR = Path("/run/geotrain-netlab")
WAN_DEVICE = "wan0"
CONTROL_DEVICE = "ctl0"
WAN_NET = (10, 77, 0)
"""Sites' WAN addresses: 10.77.0.(K+1)/24, inside their own namespaces only (so labs never collide)."""
CONTROL_NET = (10, 78)
"""Control subnets 10.78.N.0/24 in the host namespace, one per live lab."""
DEFAULT_MTU = 1500
MIN_QUEUE_BYTES = 64 * 1024
DEVICE_QUEUE_PACKETS = 20000
"""Each site's WAN device's transmit queue (packets). The link's queue at the router is the only queue the lab
means to have; the kernel's default for a TUN device (500 packets, 0.7 MB) would drop the start of a burst
before the router reads it whenever a window over 500 packets leaves at once (unpaced cubic: five 16 MB
syncs over 100mbit/50ms lost some 1,500 packets a site there). 20,000 holds every window the sites' send buffers
allow (4 MB, some 2,900 packets) on each of six connections; what it drops anyway is counted
(``Lab.device_drops``)."""
MAX_SITES = 64
SETUP_TIMEOUT_S = 20.0
GRACE_S = 3.0
LINK_UP_TIMEOUT_S = 10.0
_NAME = re.compile(rf"^{PREFIX}(\d+)([sc])(\d+)$")


@dataclass(frozen=True, slots=True)
class LabLink:
    """One directed link of the lab."""

    bandwidth_bps: float
    latency_s: float
    """One-way delay."""
    loss: float = 0.0
    """Probability that a packet is lost."""
    queue_bytes: int = MIN_QUEUE_BYTES
    """The link's queue; a packet that finds it full is dropped."""


@dataclass(frozen=True, slots=True)
class LabTcp:
    """How the sites' TCP behaves in the lab; unset fields keep the kernel's defaults. Deployments choose these
    (sysctl), so a rehearsal may too."""

    congestion_control: str | None = None
    """The algorithm of every connection between sites (``cubic``, ``bbr``, ``reno``, ... as the kernel has
    them; set on the sites' WAN route, which namespaces may do for any algorithm the kernel has). None: the
    host's default, which new namespaces inherit."""
    idle_restart: bool | None = None
    """Whether a connection idle for longer than its retransmission timeout restarts from a small congestion
    window (``net.ipv4.tcp_slow_start_after_idle`` in each site's namespace; the kernel's default is on). It
    does not act on BBR, which paces after idle by its own rule. None: the kernel's default."""

    @classmethod
    def parse(cls, text: str) -> LabTcp:
        """``host``, or comma-separated: a congestion control and/or ``idle-restart`` / ``no-idle-restart``, e.g.
        ``cubic,no-idle-restart``."""
        cc, restart = None, None
        for word in (w.strip() for w in text.split(",")):
            if word == "host":
                continue
            if word in ("idle-restart", "no-idle-restart"):
                if restart is not None:
                    raise ConfigError(f"give idle-restart or no-idle-restart once, in {text!r}", field="--tcp")
                restart = word == "idle-restart"
            elif re.fullmatch(r"[a-z][a-z0-9_]*", word) and cc is None:
                cc = word
            else:
                raise ConfigError(f"{word!r} in {text!r}: give host, or a congestion control (cubic, bbr, reno, ...) "
                                  "and/or idle-restart or no-idle-restart, comma-separated", field="--tcp")
        return cls(cc, restart)

    def describe(self) -> str:
        """What the sites run, in words: unset fields read from this machine."""
        name = self.congestion_control or _proc_sys("net/ipv4/tcp_congestion_control") or "unknown"
        cc = name if self.congestion_control else f"{name} (the host's)"
        restart = {True: "on", False: "off", None: "on (the kernel's default)"}[self.idle_restart]
        unused = ", which BBR does not use" if name == "bbr" and self.idle_restart is not None else ""
        return f"{cc}, slow start after idle {restart}{unused}"

    def check(self) -> None:
        """ConfigError unless the kernel has the congestion control asked for."""
        if self.congestion_control is None:
            return
        have = (_proc_sys("net/ipv4/tcp_available_congestion_control") or "").split()
        if self.congestion_control not in have:
            raise ConfigError(f"the kernel has no {self.congestion_control!r} congestion control; it has "
                              f"{', '.join(have) or 'none listed'} (a module may load it: modprobe "
                              f"tcp_{self.congestion_control})", field="--tcp")


def _proc_sys(key: str) -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys", key).read_text().strip()
    return None


def lab_links(topology: Topology, *, queue_bytes: int | None = None, loss: float = 0.0,
              pairs: dict[tuple[int, int], tuple[float, int | None]] | None = None) -> dict[tuple[int, int], LabLink]:
    """Both directions of every pair of the topology's sites. A pair with no link (``none``) is unshaped.
    ``queue_bytes`` unset: one bandwidth-delay product of the round trip, at least 64 KB. ``pairs``: a pair's own
    loss and queue (None: the lab's), ahead of ``loss`` and ``queue_bytes`` (:func:`config_lab_links`)."""
    pairs = {(min(a, b), max(a, b)): v for (a, b), v in (pairs or {}).items()}
    for where, (p, q) in [("--loss/--queue", (loss, queue_bytes)), *((f"wan.links {k}", v) for k, v in pairs.items())]:
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"loss must be a probability from 0 to below 1, got {p!r}", field=f"{where} loss")
        if q is not None and q < DEFAULT_MTU:
            raise ConfigError(f"a queue of {q} bytes cannot hold one packet; give at least {DEFAULT_MTU}",
                              field=f"{where} queue")
    links = {}
    for a in range(topology.sites):
        for b in range(topology.sites):
            if a == b:
                continue
            p, q = pairs.get((min(a, b), max(a, b)), (loss, queue_bytes))
            q = queue_bytes if q is None else q
            link = topology.link(a, b)
            if link is None:
                links[(a, b)] = LabLink(MAX_BANDWIDTH, 0.0, p, q or 1 << 30)
                continue
            bdp = int(2 * link.latency_s * link.bandwidth_bps / 8)
            links[(a, b)] = LabLink(link.bandwidth_bps, link.latency_s, p, q or max(MIN_QUEUE_BYTES, bdp))
    return links


def config_lab_links(config: Any, *, queue_bytes: int | None = None,
                     loss: float = 0.0) -> dict[tuple[int, int], LabLink]:
    """The lab's links for a run's configuration: its topology, with each ``[[wan.links]]`` entry's own ``loss``
    and ``queue`` where it sets them, and ``loss`` and ``queue_bytes`` (``--loss``, ``--queue``) elsewhere."""
    pairs = {pair: (o.loss or loss, o.queue_bytes()) for pair, o in config.link_pairs()
             if o.loss or o.queue is not None}
    return lab_links(config.topology(), queue_bytes=queue_bytes, loss=loss, pairs=pairs)


ROUTER_MEASURED_BPS = {"c": 1458e6, "python": 657e6}
"""What the router forwarded in all, by data plane, with every link busy at once: 4 sites each sending to each
other over unshaped links (12 TCP streams), median of 3 on a 2-core machine (``benchmarks/netlab_router_bench.py
--sites 4``, 2026-12-02). Links whose rates add up to more may be limited by the router."""
FORWARDERS = ("auto", "c", "python")


def router_warning(links: dict[tuple[int, int], LabLink], forwarder: str = "c") -> str | None:
    """A warning when the lab's links, all busy at once (an all-to-all uses every pair), carry more than the
    router was measured to forward with ``forwarder`` (``c`` or ``python``); None otherwise."""
    total = sum(link.bandwidth_bps for link in links.values() if link.bandwidth_bps < MAX_BANDWIDTH)
    limit = ROUTER_MEASURED_BPS[forwarder]
    if total <= limit:
        return None
    return (f"the lab's links add up to {total / 1e6:,.0f} Mbit/s in all directions, more than the router "
            f"({'forward.c' if forwarder == 'c' else 'one Python process'}) was measured to forward "
            f"({limit / 1e6:,.0f} Mbit/s on a 2-core machine): when "
            "many links are busy at once, the router, not the links, may set the pace")


def require_root() -> None:
    """ConfigError (exit code 2) unless this process may build namespaces."""
    if os.geteuid() != 0:
        raise ConfigError("the network lab builds network namespaces and needs root: run it as root (sudo), or "
                          "use the WAN emulator (geotrain run without --network netlab)", field="--network")
    for need in ("/dev/net/tun",):
        if not os.path.exists(need):
            raise ConfigError(f"the network lab needs {need} (the tun module); load it (modprobe tun) or use the "
                              "WAN emulator", field="--network")
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        raise ConfigError("the network lab needs the 'ip' command (iproute2); install it or use the WAN emulator",
                          field="--network") from None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a live owner from a reused PID), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def _owner_alive(pid: int) -> bool:
    started = _start_time(pid)
    if started is None:
        return False
    state = STATE_DIR / f"{pid}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(state.read_text())["start_time"] == started
    return True  # no state file: the PID lives, so the lab may be in setup; leave it alone


@contextlib.contextmanager
def _locked():
    """Serialise set-up and cleaning of labs on this machine."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _our_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip() and _NAME.match(line.split()[0])]


def _our_links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if _NAME.match(name):
                names.append(name)
    return names


def stale_labs() -> list[int]:
    """Owner PIDs of labs on this machine whose owner is gone (what :func:`clean_stale` would remove)."""
    owners = {int(_NAME.match(n).group(1)) for n in _our_namespaces() + _our_links()}
    owners |= {int(p.stem) for p in STATE_DIR.glob("*.json") if p.stem.isdigit()} if STATE_DIR.is_dir() else set()
    return sorted(pid for pid in owners if not _owner_alive(pid))


def _pids_in(namespace: str) -> list[int]:
    out = _ip("netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _remove(owner: int) -> None:
    """Remove everything of the lab owned by ``owner``: its router, the processes in its namespaces, the
    namespaces, any host interface left, the state file."""
    state = STATE_DIR / f"{owner}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        info = json.loads(state.read_text())
        router = int(info["router_pid"])
        if _start_time(router) == info.get("router_start_time"):
            _kill([router])
    mine = [n for n in _our_namespaces() if int(_NAME.match(n).group(1)) == owner]
    for ns in mine:
        for _ in range(10):  # processes may fork while we kill: a few passes, bounded
            pids = _pids_in(ns)
            if not pids:
                break
            _kill(pids)
            time.sleep(0.05)
    for ns in mine:
        _ip("netns", "del", ns, check=False)
    for link in _our_links():
        if int(_NAME.match(link).group(1)) == owner:
            _ip("link", "del", link, check=False)
    state.unlink(missing_ok=True)


def clean_stale() -> list[int]:
    """Remove every lab whose owner is gone (killed with SIGKILL, say). Returns their owners' PIDs."""
    with _locked():
        owners = stale_labs()
        for owner in owners:
            _remove(owner)
    return owners


def _free_control_subnet() -> int:
    used = set()
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        m = re.search(rf"inet {CONTROL_NET[0]}\.{CONTROL_NET[1]}\.(\d+)\.", line)
        if m:
            used.add(int(m.group(1)))
    for line in _ip("-4", "route", "show", check=False).stdout.splitlines():
        m = re.match(rf"{CONTROL_NET[0]}\.{CONTROL_NET[1]}\.(\d+)\.", line)
        if m:
            used.add(int(m.group(1)))
    free = [n for n in range(1, 255) if n not in used]
    if not free:
        raise RuntimeError(f"no free control subnet in {CONTROL_NET[0]}.{CONTROL_NET[1]}.0.0/16")
    return free[0]


@dataclass(slots=True)
class Lab:
    """One lab: namespaces, router and control links for ``sites`` sites. Use as a context manager."""

    sites: int
    links: dict[tuple[int, int], LabLink]
    """Directed links (a, b) for every ordered pair of sites."""
    mtu: int = DEFAULT_MTU
    seed: int = 0
    owner: int = field(default_factory=os.getpid)
    subnet: int | None = None
    """N of the control subnet 10.78.N.0/24, chosen at setup."""
    router: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    """Commands started in the lab (``popen``), stopped at close."""
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    """After close: per directed link ``"a->b"``, the packets and bytes the router forwarded and dropped."""
    forwarder: str = "auto"
    """The router's data plane: ``c`` (``forward.c``, built with the machine's compiler; an error if it cannot
    be), ``python`` (the reference loop in ``router.py``), or ``auto`` (C where it builds, else Python)."""
    forwarder_used: str | None = None
    """After open: ``c`` or ``python``."""
    forwarder_note: str | None = None
    """After open with ``auto``: why the lab forwards in Python, when it does."""
    tcp: LabTcp = field(default_factory=LabTcp)
    """The sites' TCP settings (:class:`LabTcp`)."""
    device_drops: dict[int, int] = field(default_factory=dict)
    """After close: per site, the packets its own WAN device dropped before the router read them (the site's
    transmit queue; 0 unless a burst outgrew ``DEVICE_QUEUE_PACKETS``)."""
    _closed: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.sites <= MAX_SITES:
            raise ConfigError(f"a lab needs 2 to {MAX_SITES} sites, got {self.sites}", field="run.sites")
        if self.forwarder not in FORWARDERS:
            raise ConfigError(f"the lab's forwarder is one of {', '.join(FORWARDERS)}, got {self.forwarder!r}",
                              field="--router")
        if not 576 <= self.mtu <= 65535:
            raise ConfigError(f"the MTU must lie between 576 and 65535 bytes, got {self.mtu}", field="--mtu")
        missing = [(a, b) for a in range(self.sites) for b in range(self.sites) if a != b and (a, b) not in self.links]
        assert not missing, f"links missing for {missing}"

    # -- names and addresses ------------------------------------------------------------------------------
    def namespace(self, k: int) -> str:
        return f"{PREFIX}{self.owner}s{k}"

    def host_device(self, k: int) -> str:
        return f"{PREFIX}{self.owner}c{k}"

    @staticmethod
    def wan_address(k: int) -> str:
        return "{}.{}.{}.{}".format(*WAN_NET, k + 1)

    @property
    def control_address(self) -> str:
        """Where the host namespace (the coordinator) is reached from every site."""
        return f"{CONTROL_NET[0]}.{CONTROL_NET[1]}.{self.subnet}.1"

    def _site_control_address(self, k: int) -> str:
        return f"{CONTROL_NET[0]}.{CONTROL_NET[1]}.{self.subnet}.{k + 2}"

    def site_env(self, k: int) -> dict[str, str]:
        """Environment of a process of site ``k``: where it is and how to reach the others."""
        return {"GEOTRAIN_NETNS": self.namespace(k), "GLOO_SOCKET_IFNAME": WAN_DEVICE,
                "NETLAB_SITE": str(k), "NETLAB_SITES": str(self.sites),
                "NETLAB_ADDRESSES": ",".join(self.wan_address(j) for j in range(self.sites)),
                "NETLAB_CONTROL_ADDRESS": self.control_address}

    # -- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        """Build the lab (cleaning stale labs first); on any failure remove what was built and raise."""
        require_root()
        self.tcp.check()
        clean_stale()
        binary = self._forwarder_binary()
        try:
            with _locked():
                self.subnet = _free_control_subnet()
                self._write_state()
                for k in range(self.sites):
                    self._add_site(k)
            self._start_router(binary)
            for k in range(self.sites):
                ns = self.namespace(k)
                _ip("-n", ns, "addr", "add", f"{self.wan_address(k)}/24", "dev", WAN_DEVICE)
                _ip("-n", ns, "link", "set", WAN_DEVICE, "mtu", str(self.mtu), "txqueuelen", str(DEVICE_QUEUE_PACKETS),
                    "up")
                self._set_tcp(k)
        except BaseException:
            self.close()
            raise

    def _write_state(self) -> None:
        info = {"owner": self.owner, "start_time": _start_time(self.owner), "sites": self.sites,
                "subnet": self.subnet}
        if self.router is not None:
            info |= {"router_pid": self.router.pid, "router_start_time": _start_time(self.router.pid)}
        tmp = STATE_DIR / f".{self.owner}.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(STATE_DIR / f"{self.owner}.json")

    def _add_site(self, k: int) -> None:
        ns, host = self.namespace(k), self.host_device(k)
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", host, "type", "veth", "peer", "name", CONTROL_DEVICE, "netns", ns)
        _ip("addr", "add", self.control_address, "peer", f"{self._site_control_address(k)}/32", "dev", host)
        _ip("link", "set", host, "up")
        _ip("-n", ns, "addr", "add", self._site_control_address(k), "peer", f"{self.control_address}/32", "dev",
            CONTROL_DEVICE)
        _ip("-n", ns, "link", "set", CONTROL_DEVICE, "up")

    def _set_tcp(self, k: int) -> None:
        ns = self.namespace(k)
        if self.tcp.congestion_control is not None:
            _ip("-n", ns, "route", "replace", "{}.{}.{}.0/24".format(*WAN_NET), "dev", WAN_DEVICE, "proto", "kernel",
                "scope", "link", "src", self.wan_address(k), "congctl", self.tcp.congestion_control)
        if self.tcp.idle_restart is not None:
            # /proc/sys/net is the namespace of whoever opens it: write it from a child inside the namespace.
            key = Path("/proc/sys/net/ipv4/tcp_slow_start_after_idle")
            subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(key),
                            "1" if self.tcp.idle_restart else "0"], preexec_fn=self._enter(k), check=True,
                           timeout=30, capture_output=True)

    def _enter(self, k: int) -> Callable[[], None]:
        """What a child runs before exec to live in site ``k``'s namespace."""
        ns_path = f"/run/netns/{self.namespace(k)}"

        def enter() -> None:
            fd = os.open(ns_path, os.O_RDONLY)
            _setns(fd)
            os.close(fd)

        return enter

    def _forwarder_binary(self) -> str | None:
        """The compiled C data plane, or None to forward in Python."""
        from geotrain.netlab.cforward import ForwarderUnavailable, build

        self.forwarder_used = "python"
        if self.forwarder == "python":
            return None
        try:
            binary = str(build())
        except ForwarderUnavailable as e:
            if self.forwarder == "c":
                raise ConfigError(f"the lab's C forwarder cannot be built: {e}", field="--router") from None
            self.forwarder_note = (f"the lab forwards in Python, which carries about "
                                   f"{ROUTER_MEASURED_BPS['python'] / 1e6:.0f} Mbit/s in all: {e}")
            return None
        self.forwarder_used = "c"
        return binary

    def _router_config(self, forwarder: str | None = None) -> dict[str, Any]:
        return {"owner": self.owner, "forwarder": forwarder,
                "namespaces": [self.namespace(k) for k in range(self.sites)], "device": WAN_DEVICE,
                "prefix": list(WAN_NET), "seed": self.seed,
                "links": [[a, b, min(l.bandwidth_bps, MAX_BANDWIDTH), l.latency_s, l.loss, l.queue_bytes]
                          for (a, b), l in sorted(self.links.items())]}

    def _start_router(self, forwarder: str | None) -> None:
        config = STATE_DIR / f"{self.owner}.router.json"
        config.write_text(json.dumps(self._router_config(forwarder)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                        os.environ.get("PYTHONPATH")]))}
        self.router = subprocess.Popen([sys.executable, "-m", "geotrain.netlab.router", str(config)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                       env=env, start_new_session=True, text=True)
        self._write_state()
        line = _read_line(self.router, SETUP_TIMEOUT_S)
        config.unlink(missing_ok=True)
        if line.strip() != "ready":
            rest = ""
            with contextlib.suppress(Exception):
                self.router.kill()
                rest = self.router.communicate(timeout=5)[0] or ""
            raise RuntimeError(f"the lab's router did not start: {(line + rest).strip() or 'no output'}")

    # -- faults on the real links -------------------------------------------------------------------------
    def partition(self, k: int) -> None:
        """Cut site ``k`` off: the router drops every packet to or from it, and its control link goes down (a
        real partition also parts a site from the coordinator). Nothing fails at once; peers find out as they
        would (timeouts, missed heartbeats)."""
        self._command(f"partition {k}", k)
        _ip("link", "set", self.host_device(k), "down")

    def heal(self, k: int) -> None:
        """Undo ``partition(k)``; returns once the control link carries again (the kernel reports a veth's
        carrier with a delay of up to about a second)."""
        _ip("link", "set", self.host_device(k), "up")
        self._command(f"heal {k}", k)
        deadline = time.monotonic() + LINK_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            host = _ip("-o", "link", "show", self.host_device(k), check=False).stdout
            site = _ip("-n", self.namespace(k), "-o", "link", "show", CONTROL_DEVICE, check=False).stdout
            if "state UP" in host and "state UP" in site:
                # Neighbour entries that failed while cut off would retry only after their timer (about 1 s).
                _ip("neigh", "flush", "dev", self.host_device(k), check=False)
                _ip("-n", self.namespace(k), "neigh", "flush", "dev", CONTROL_DEVICE, check=False)
                return
            time.sleep(0.02)
        raise RuntimeError(f"site {k}'s control link did not come up within {LINK_UP_TIMEOUT_S:g} s")

    def slow(self, k: int, factor: float) -> None:
        """From now on, site ``k``'s links carry ``factor`` times fewer bits per second (a pair of slowed sites
        takes the larger factor; ``factor`` 1 restores them)."""
        if not factor >= 1.0:
            raise ValueError(f"a slow factor must be at least 1, got {factor!r}")
        self._command(f"slow {k} {float(factor)!r}", k)

    def _command(self, command: str, site: int) -> None:
        """Send one line of ``router.Conditions.apply`` to the router and wait for its answer."""
        if not 0 <= site < self.sites:
            raise ValueError(f"site {site} is not one of the lab's {self.sites} sites")
        assert self.router is not None and self.router.stdin is not None, "the lab is not open"
        self.router.stdin.write(command + "\n")
        self.router.stdin.flush()
        answer = _read_line(self.router, SETUP_TIMEOUT_S).strip()
        if answer != "ok":
            raise RuntimeError(f"the lab's router refused {command}: {answer or 'no answer'}")

    def popen(self, k: int, args: Sequence[str], *, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start ``args`` inside site ``k``'s namespace, in a session of its own, dying with this process."""
        enter_ns = self._enter(k)

        def enter() -> None:
            _die_with_parent()
            enter_ns()

        full_env = {**(os.environ if env is None else env), **self.site_env(k)}
        p = subprocess.Popen(list(args), env=full_env, preexec_fn=enter, start_new_session=True, **kwargs)
        self.procs.append(p)
        return p

    def traffic(self) -> str | None:
        """After close: what the links carried and dropped, in one line (None if the router said nothing)."""
        if not self.stats:
            return None
        packets = sum(v["packets"] for v in self.stats.values())
        nbytes = sum(v["bytes"] for v in self.stats.values())
        dropped = sum(v["dropped"] for v in self.stats.values())
        line = (f"the lab's links carried {packets:,} packets ({nbytes / 1e6:,.1f} MB) and dropped {dropped:,} at "
                "their queues")
        if self.device_drops:
            line += f"; the sites' own devices dropped {sum(self.device_drops.values()):,}"
        return line

    def close(self) -> None:
        """Stop everything the lab started and remove it. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        _stop_all(self.procs)
        if self.router is not None and self.router.poll() is None:  # the devices go with the router
            self.device_drops = {k: n for k in range(self.sites)
                                 if (n := _device_drops(self.namespace(k))) is not None}
        if self.router is not None and self.router.stdin is not None:
            with contextlib.suppress(OSError):
                self.router.stdin.close()  # its end of the commands: the router stops
        if self.router is not None and self.router.poll() is None:
            self.router.terminate()
            try:
                self.router.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                self.router.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.router.wait(timeout=GRACE_S)
        if self.router is not None and self.router.stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in self.router.stdout.read().splitlines():  # the router has exited: bounded
                    if line.startswith('{"router_stats"'):
                        self.stats = json.loads(line)["router_stats"]
            self.router.stdout.close()
        with _locked():
            _remove(self.owner)


def _device_drops(namespace: str) -> int | None:
    """Packets the site's WAN device dropped on transmit, or None if it cannot be read (teardown goes on)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, LookupError, TypeError):
        result = _ip("-n", namespace, "-j", "-s", "link", "show", WAN_DEVICE, check=False)
        return int(json.loads(result.stdout)[0]["stats64"]["tx"]["dropped"])
    return None


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line ``proc`` prints, or what it printed before exiting or ``timeout`` passing."""
    import select

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], min(0.2, max(0.0, deadline - time.monotonic())))
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            return ""
    return ""


def _stop_all(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM the process group of every live command, SIGKILL what is left after the grace period."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=GRACE_S)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def enter_namespace(name: str) -> None:
    """Move this process (its calling thread, before it starts any other) into the lab namespace ``name``:
    what a site's worker does first when ``GEOTRAIN_NETNS`` is set."""
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a lab namespace")
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)
