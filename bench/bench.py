#!/usr/bin/env python3
"""wgslirpy benchmark suite (issues 3 and 8): our gateway against the kernel baseline.

Run it through bench/run.sh (which builds the release binary), as root:

    sudo bench/run.sh [--quick] [--binary PATH] [--gateway-arg ARG ...] [--measure LIST]

For each gateway it builds three network namespaces, as the end-to-end rig does:

    peer ns (wireguard-go peer) --veth-- gateway ns --veth-- internet ns (servers)

and in the gateway ns runs either
  * wgslirpy (release build), or
  * the BASELINE: a second wireguard-go with kernel forwarding (ip_forward) and nftables
    masquerade toward the internet ns,
serving the same kind of wireguard-go peer. Both topologies are up at once. It measures:
  1. per gateway, 10,000 idle TCP connections: gateway RSS and descriptors before, with
     them open, and after they close; all 10,000 must still echo;
  2. latency, in rounds that alternate between the two gateways (so that the shared
     machine's drift during the run weighs on both alike):
     short TCP connections (connect, one request, one reply, close), median and p99;
     UDP echo round trips, p50 and p99; ICMP echo round trips, p50; then the gateway's
     share of a UDP echo (time in its namespace, from perf's net tracepoints) and its CPU
     per echo, against a null relay's (socat: what the machine itself costs);
  3. iperf3 TCP throughput, peer -> internet and internet -> peer (-R), 1 and 4 streams,
     in rounds that alternate between the gateways too (one busy at a time), with the
     gateway process's CPU-seconds (utime + stime) per GB received, and its busiest
     thread's (with several threads, the one that limits throughput); then, as a floor, the
     kernel's cost of the host side alone: iperf3 from the gateway namespace at our rates;
  4. per gateway: 200 concurrent connections each echoing 1 MB, all byte-exact.
`--measure short,udp` runs only those measurements (names: idle, short, udp, icmp, share,
iperf, echo), for quick experiments. It prints a markdown table (absolute values and ratios
ours / baseline) and writes it to bench/results/. Network rule: every packet stays inside the
namespaces it creates; they and every process it starts are removed (by PID) at the end,
also on failure or Ctrl-C.

The same file is also the servers and clients it runs inside the namespaces
(`bench.py serve ...`, `bench.py client ...`).
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Address plan: the same as wgslirpy/tests/rig/mod.rs.
PEER_UNDERLAY_V4, GW_UNDERLAY_V4 = "198.18.1.2", "198.18.1.1"
PEER_UNDERLAY_V6, GW_UNDERLAY_V6 = "fd00:1::2", "fd00:1::1"
GW_INET_V4, GW_INET_V6 = "198.18.2.1", "fd00:2::1"
INET_V4, INET_V6 = "198.18.2.2", "fd00:2::2"
PEER_INNER_V4, PEER_INNER_V6 = "198.19.77.2", "fd77::2"
GW_INNER_V4, GW_INNER_V6 = "198.19.77.1", "fd77::1"
GW_PORT, PEER_PORT = 51820, 51821
MTU = 1420
ECHO_PORT, REPLY_PORT, UDP_ECHO_PORT, IPERF_PORT = 7, 8, 7, 5201
UDP_ECHO_SIZE = 64
NULL_RELAY_PORT, NULL_RELAY_CLIENT_PORT = 9000, 40000


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


# ---------------------------------------------------------------------------------------
# Servers (internet ns): TCP echo, one-request-one-reply, UDP echo. One asyncio process.
# ---------------------------------------------------------------------------------------


async def serve_main():
    raise_nofile()

    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def reply(reader, writer):
        try:
            await reader.readuntil(b"\n")
            writer.write(b"R" * 99 + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    class UdpEcho(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    loop = asyncio.get_running_loop()
    servers = []
    for port, handler in ((ECHO_PORT, echo), (REPLY_PORT, reply)):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        servers.append(await asyncio.start_server(handler, sock=s, backlog=4096))
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", UDP_ECHO_PORT))
    await loop.create_datagram_endpoint(UdpEcho, sock=u)
    print("serving", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------
# Clients (peer ns)
# ---------------------------------------------------------------------------------------


async def client_idle(host, count, concurrency):
    """Opens `count` connections to the echo server, then obeys stdin: `echo` checks that
    every one echoes, `close` closes them all."""
    raise_nofile()
    conns = []
    sem = asyncio.Semaphore(concurrency)
    failures = []

    async def open_one():
        async with sem:
            for attempt in range(3):
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(host, ECHO_PORT), 30)
                    conns.append((r, w))
                    return
                except (OSError, asyncio.TimeoutError) as e:
                    err = e
                    await asyncio.sleep(0.5)
            failures.append(repr(err))

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(count)))
    print("opened", len(conns), "failed", len(failures), "%.2f" % (time.monotonic() - t0),
          flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        line = (await stdin.readline()).decode().strip()
        if line == "echo":
            async def one(i, r, w):
                async with sem:
                    msg = b"%08d\n" % i
                    w.write(msg)
                    await w.drain()
                    got = await asyncio.wait_for(r.readexactly(len(msg)), 30)
                    return got == msg
            t0 = time.monotonic()
            results = await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(conns)),
                                           return_exceptions=True)
            ok = sum(1 for x in results if x is True)
            print("echoed", ok, "of", len(conns), "%.2f" % (time.monotonic() - t0), flush=True)
        elif line == "close" or not line:
            for _, w in conns:
                w.close()
            await asyncio.sleep(0.5)
            print("closed", len(conns), flush=True)
            return


def client_short(host, count):
    """`count` sequential short connections (connect, request, reply, close); prints the
    milliseconds each took."""
    times = []
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for i in range(count):
        t0 = time.perf_counter()
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect((host, REPLY_PORT))
        s.sendall(b"GET /%d\n" % i)
        got = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            got += d
        s.close()
        times.append((time.perf_counter() - t0) * 1000)
        if len(got) != 100:
            print("bad reply", len(got), flush=True)
            sys.exit(1)
    print("times", " ".join("%.3f" % t for t in times), flush=True)


def client_udp(host, count, port=UDP_ECHO_PORT):
    """`count` sequential UDP echoes of UDP_ECHO_SIZE bytes to `host` (`port`, or the echo
    server's); prints the round trips in microseconds (a lost datagram is retried after 1 s
    and not counted). Toward another port (the null relay, which answers only the first
    address it heard from) it sends from NULL_RELAY_CLIENT_PORT every time."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if port != UDP_ECHO_PORT:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", NULL_RELAY_CLIENT_PORT))
    s.settimeout(1)
    s.connect((host, port))
    times, lost = [], 0
    for i in range(count):
        msg = b"%08d" % i + b"u" * (UDP_ECHO_SIZE - 8)
        while True:
            t0 = time.perf_counter()
            s.send(msg)
            try:
                while s.recv(2048) != msg:
                    pass
                break
            except socket.timeout:
                lost += 1
        times.append((time.perf_counter() - t0) * 1e6)
    print("lost", lost, flush=True)
    print("times", " ".join("%.1f" % t for t in times), flush=True)


async def client_echo(host, conns, size):
    """`conns` concurrent connections each echo `size` random bytes; prints `ok N SECONDS`."""
    raise_nofile()
    sem = asyncio.Semaphore(conns)

    async def one():
        async with sem:
            data = os.urandom(size)
            r, w = await asyncio.wait_for(asyncio.open_connection(host, ECHO_PORT), 30)

            async def send():
                for i in range(0, size, 65536):
                    w.write(data[i:i + 65536])
                    await w.drain()
                w.write_eof()

            sender = asyncio.create_task(send())
            got = bytearray()
            while True:
                d = await r.read(1 << 20)
                if not d:
                    break
                got += d
            await sender
            w.close()
            return bytes(got) == data

    t0 = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(conns)), return_exceptions=True)
    bad = [r for r in results if r is not True]
    for r in bad[:5]:
        print("bad", repr(r), flush=True)
    print("ok", conns - len(bad), "%.2f" % (time.monotonic() - t0), flush=True)


def client_main(argv):
    cmd = argv[0]
    if cmd == "idle":
        asyncio.run(client_idle(argv[1], int(argv[2]), int(argv[3])))
    elif cmd == "short":
        client_short(argv[1], int(argv[2]))
    elif cmd == "udp":
        client_udp(argv[1], int(argv[2]), *(int(a) for a in argv[3:4]))
    elif cmd == "echo":
        asyncio.run(client_echo(argv[1], int(argv[2]), int(argv[3])))
    else:
        sys.exit("unknown client " + cmd)


# ---------------------------------------------------------------------------------------
# Orchestration (host, as root)
# ---------------------------------------------------------------------------------------


class Topology:
    """Three namespaces, a wireguard-go peer, servers, and one gateway (ours or baseline).
    Everything it starts is stopped by PID in `close()`."""

    def __init__(self, kind, binary, gateway_args, log_dir):
        self.kind = kind
        self.tag = "%d%s" % (os.getpid() % 100000, "o" if kind == "ours" else "b")
        self.ns = {r: "wgsb-%s-%s" % (self.tag, r) for r in ("peer", "gw", "inet")}
        self.procs = []
        self.devs = []
        self.binary = binary
        self.gateway_args = gateway_args
        self.log_dir = log_dir
        self.gateway_pid = None
        self.peer_wg_pid = None

    # -- helpers --
    def sh(self, *argv, ns=None, check=True, timeout=30, input=None):
        cmd = (["ip", "netns", "exec", self.ns[ns]] if ns else []) + list(argv)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise RuntimeError("%s failed (%d): %s%s" % (" ".join(cmd), r.returncode,
                                                          r.stdout, r.stderr))
        return r.stdout

    def ip(self, ns, args):
        return self.sh("ip", "-n", self.ns[ns], *args.split())

    def spawn(self, name, ns, argv, env=None, pipes=False):
        log = open(os.path.join(self.log_dir, "%s-%s.log" % (self.kind, name)), "w")
        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[ns]] + argv, env=e,
                             stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                             stdout=subprocess.PIPE if pipes else log, stderr=log,
                             text=True)
        p.bench_name = name
        self.procs.append(p)
        return p

    def keygen(self):
        priv = self.sh("wg", "genkey").strip()
        pub = self.sh("wg", "pubkey", input=priv + "\n").strip()
        return priv, pub

    def wireguard_go(self, ns, dev, priv, port):
        p = self.spawn("wireguard-go-" + ns, ns, ["wireguard-go", "-f", dev],
                       env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
                            "LOG_LEVEL": "error"})
        self.devs.append(dev)
        sock = "/var/run/wireguard/%s.sock" % dev
        wait(lambda: os.path.exists(sock), 10, "wireguard-go control socket " + sock)
        key = os.path.join(self.log_dir, dev + ".key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(priv + "\n")
        self.sh("wg", "set", dev, "private-key", key, "listen-port", str(port), ns=ns)
        return p

    # -- setup --
    def up(self):
        for n in self.ns.values():
            self.sh("ip", "netns", "add", n)
        for r in self.ns:
            self.ip(r, "link set lo up")
        self.ip("peer", "link add up0 type veth peer name peer0 netns " + self.ns["gw"])
        self.ip("gw", "link add inet0 type veth peer name gw0 netns " + self.ns["inet"])
        for ns, dev, v4, v6 in (("peer", "up0", PEER_UNDERLAY_V4, PEER_UNDERLAY_V6),
                                ("gw", "peer0", GW_UNDERLAY_V4, GW_UNDERLAY_V6),
                                ("gw", "inet0", GW_INET_V4, GW_INET_V6),
                                ("inet", "gw0", INET_V4, INET_V6)):
            self.ip(ns, "addr add %s/24 dev %s" % (v4, dev))
            self.ip(ns, "addr add %s/64 dev %s nodad" % (v6, dev))
            self.ip(ns, "link set %s up" % dev)
        self.ip("gw", "route add default via " + INET_V4)
        self.ip("gw", "-6 route add default via " + INET_V6)

        serve = self.spawn("servers", "inet", [sys.executable, __file__, "serve"])
        iperf = self.spawn("iperf3", "inet", ["iperf3", "-s", "-p", str(IPERF_PORT)])
        wait(lambda: "serving" in read_log(self, "servers"), 10, "servers")
        wait(lambda: (":%d " % IPERF_PORT) in self.sh("ss", "-Htln", ns="inet"), 10,
             "iperf3 -s")

        gw_priv, gw_pub = self.keygen()
        peer_priv, peer_pub = self.keygen()
        peer_dev, gw_dev = "wgb%sp" % self.tag, "wgb%sg" % self.tag
        self.peer_wg_pid = self.wireguard_go("peer", peer_dev, peer_priv, PEER_PORT).pid
        self.ip("peer", "addr add %s/32 dev %s" % (PEER_INNER_V4, peer_dev))
        self.ip("peer", "addr add %s/128 dev %s nodad" % (PEER_INNER_V6, peer_dev))
        self.ip("peer", "link set %s mtu %d up" % (peer_dev, MTU))
        self.ip("peer", "route add default dev " + peer_dev)
        self.ip("peer", "-6 route add default dev " + peer_dev)

        if self.kind == "ours":
            argv = [self.binary, "-k", gw_priv, "-K", peer_pub,
                    "-b", "%s:%d" % (GW_UNDERLAY_V4, GW_PORT),
                    "-p", "%s:%d" % (PEER_UNDERLAY_V4, PEER_PORT),
                    "-P", GW_INNER_V4, "-P", GW_INNER_V6] + self.gateway_args
            gw = self.spawn("gateway", "gw", argv, env={"RUST_LOG": "warn"})
            wait(lambda: (":%d " % GW_PORT) in self.sh("ss", "-Hunl", ns="gw"), 10,
                 "wgslirpy to bind")
        else:
            gw = self.wireguard_go("gw", gw_dev, gw_priv, GW_PORT)
            self.sh("wg", "set", gw_dev, "peer", peer_pub, "allowed-ips",
                    "%s/32,%s/128" % (PEER_INNER_V4, PEER_INNER_V6),
                    "endpoint", "%s:%d" % (PEER_UNDERLAY_V4, PEER_PORT), ns="gw")
            self.ip("gw", "addr add %s/24 dev %s" % (GW_INNER_V4, gw_dev))
            self.ip("gw", "addr add %s/64 dev %s nodad" % (GW_INNER_V6, gw_dev))
            self.ip("gw", "link set %s mtu %d up" % (gw_dev, MTU))
            self.sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns="gw")
            self.sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns="gw")
            self.sh("nft", "-f", "-", ns="gw", input=(
                "table inet nat {\n chain postrouting {\n"
                "  type nat hook postrouting priority srcnat; policy accept;\n"
                "  oifname \"inet0\" masquerade\n }\n}\n"))
        self.gateway_pid = gw.pid
        self.sh("wg", "set", peer_dev, "peer", gw_pub, "allowed-ips", "0.0.0.0/0,::/0",
                "endpoint", "%s:%d" % (GW_UNDERLAY_V4, GW_PORT), "persistent-keepalive", "5",
                ns="peer")

        def handshake():
            out = self.sh("wg", "show", peer_dev, "latest-handshakes", ns="peer")
            return any(int(l.split()[1]) > 0 for l in out.splitlines() if l.strip())
        wait(handshake, 20, "WireGuard handshake")
        # The gateway must answer through the tunnel before we measure anything.
        wait(lambda: subprocess.run(["ip", "netns", "exec", self.ns["peer"], "ping", "-c1",
                                     "-W1", INET_V4], capture_output=True).returncode == 0,
             20, "ping through the gateway")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 3
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for n in self.ns.values():
            pids = subprocess.run(["ip", "netns", "pids", n], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)
        for dev in self.devs:
            try:
                os.remove("/var/run/wireguard/%s.sock" % dev)
            except FileNotFoundError:
                pass


def read_log(topo, name):
    try:
        with open(os.path.join(topo.log_dir, "%s-%s.log" % (topo.kind, name))) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait(probe, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if probe():
            return
        time.sleep(0.05)
    raise RuntimeError("timed out waiting for " + what)


def cpu_seconds(pid):
    return cpu_seconds_of("/proc/%d/stat" % pid)


def cpu_seconds_of(stat_path):
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (1-based): 12 and 13 here.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid):
    """CPU-seconds (utime + stime) of each thread of `pid`, by thread id."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            out[tid] = cpu_seconds_of("/proc/%d/task/%s/stat" % (pid, tid))
        except OSError:
            pass  # the thread ended meanwhile
    return out


def run_seconds(pid):
    """CPU-seconds that every thread of `pid` has run so far, to the nanosecond (schedstat),
    for measures too short for utime and stime's clock ticks."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # the thread ended meanwhile
    return total / 1e9


def context_switches(pid):
    """Context switches of every thread of `pid` so far, voluntary (a thread went to sleep:
    each is a wake-up later) and not: a measure of how much work each wake-up carries."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                total += sum(int(l.split()[1]) for l in f if "ctxt_switches" in l)
        except OSError:
            pass  # the thread ended meanwhile
    return total


def busiest_thread_delta(before, after):
    """The largest CPU-seconds one thread spent between two thread_cpu_seconds."""
    return max((cpu - before.get(tid, 0.0) for tid, cpu in after.items()), default=0.0)


def udp_receive_drops(topo, ns):
    """Datagrams the kernel dropped in namespace `ns` for a full socket receive buffer
    (`UdpRcvbufErrors`): in "gw", the gateway's tunnel socket; in "peer", the peer's."""
    lines = [l.split() for l in topo.sh("cat", "/proc/net/snmp", ns=ns).splitlines()
             if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def client(topo, args, timeout):
    """Runs `bench.py client ARGS` in the peer ns; returns its stdout."""
    return topo.sh(sys.executable, __file__, "client", *args, ns="peer", timeout=timeout)


def measure_idle(topo, count, res, log):
    pid = topo.gateway_pid
    time.sleep(1)
    rss0, fds0 = rss_bytes(pid), fd_count(pid)
    p = topo.spawn("idle-client", "peer",
                   [sys.executable, __file__, "client", "idle", INET_V4, str(count), "200"],
                   pipes=True)
    line = p.stdout.readline().split()
    if not line or line[0] != "opened":
        raise RuntimeError("idle client: %r" % line)
    opened, failed, secs = int(line[1]), int(line[3]), float(line[4])
    time.sleep(2)
    rss1, fds1 = rss_bytes(pid), fd_count(pid)
    p.stdin.write("echo\n")
    p.stdin.flush()
    echoed = p.stdout.readline().split()
    p.stdin.write("close\n")
    p.stdin.flush()
    p.stdout.readline()
    p.wait(30)
    t0 = time.time()
    while fd_count(pid) > fds0 and time.time() - t0 < 30:
        time.sleep(0.1)
    back = time.time() - t0
    time.sleep(1)
    rss2, fds2 = rss_bytes(pid), fd_count(pid)
    res.update(idle_count=count, idle_opened=opened, idle_failed=failed, idle_open_s=secs,
               idle_rss0=rss0, idle_rss1=rss1, idle_rss2=rss2,
               idle_per_conn=(rss1 - rss0) / max(opened, 1),
               idle_fds0=fds0, idle_fds1=fds1, idle_fds2=fds2, idle_fds_back_s=back,
               idle_echoed=int(echoed[1]) if echoed[:1] == ["echoed"] else 0)
    log("  %d idle: opened %d in %.1f s, RSS %.1f -> %.1f MiB (%.2f KiB each), %s, "
        "fds %d -> %d -> %d, RSS after close %.1f MiB"
        % (count, opened, secs, rss0 / 2**20, rss1 / 2**20, res["idle_per_conn"] / 1024,
           " ".join(echoed), fds0, fds1, fds2, rss2 / 2**20))


def short_times(topo, count):
    """Milliseconds per short connection, `count` of them."""
    out = client(topo, ["short", INET_V4, str(count)], 300)
    return [float(t) for t in out.split("times", 1)[1].split()]


def udp_times(topo, count, host=INET_V4, port=UDP_ECHO_PORT):
    """Microseconds per UDP echo, `count` of them (to the echo server, or to `host` and
    `port`), and how many datagrams were lost."""
    out = client(topo, ["udp", host, str(count), str(port)], 300)
    return ([float(t) for t in out.split("times", 1)[1].split()],
            int(out.split("lost", 1)[1].split()[0]))


def icmp_times(topo, count):
    """Milliseconds per answered ping, `count` pings."""
    out = topo.sh("ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", INET_V4,
                  ns="peer", check=False, timeout=60)
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


LATENCY_ROUNDS = 5


def measure_latency(topos, results, args, log):
    """Short connections, UDP echoes and pings through every gateway, in LATENCY_ROUNDS
    rounds that alternate between the gateways (ours first in even rounds), so that drift
    in the shared machine's speed during the run weighs on both alike."""
    wanted = [m for m in ("short", "udp", "icmp") if m in args.measure]
    if not wanted:
        return
    samples = {kind: {"short": [], "udp": [], "icmp": [], "udp_lost": 0,
                      "short_round_p50": []} for kind in topos}
    for topo in topos.values():
        short_times(topo, 20)  # warm up
    for r in range(LATENCY_ROUNDS):
        order = list(topos) if r % 2 == 0 else list(reversed(list(topos)))
        for kind in order:
            topo, got = topos[kind], samples[kind]
            if "short" in wanted:
                times = short_times(topo, max(1, args.short // LATENCY_ROUNDS))
                got["short"] += times
                got["short_round_p50"].append(round(statistics.median(times), 3))
            if "udp" in wanted:
                times, lost = udp_times(topo, max(1, args.udp // LATENCY_ROUNDS))
                got["udp"] += times
                got["udp_lost"] += lost
            if "icmp" in wanted:
                got["icmp"] += icmp_times(topo, max(1, args.icmp // LATENCY_ROUNDS))
        log("  latency round %d of %d done" % (r + 1, LATENCY_ROUNDS))
    for kind, got in samples.items():
        res = results[kind]
        if got["short"]:
            res.update(short_p50=statistics.median(got["short"]),
                       short_p99=percentile(got["short"], 99),
                       short_round_p50=got["short_round_p50"])
            log("  %s: short connections p50 %.3f ms (rounds: %s), p99 %.3f ms"
                % (kind, res["short_p50"], " ".join(map(str, got["short_round_p50"])),
                   res["short_p99"]))
        if got["udp"]:
            res.update(udp_p50=statistics.median(got["udp"]), udp_p99=percentile(got["udp"], 99),
                       udp_lost=got["udp_lost"])
            log("  %s: UDP echo RTT p50 %.0f us, p99 %.0f us, lost %d"
                % (kind, res["udp_p50"], res["udp_p99"], res["udp_lost"]))
        if "icmp" in wanted:
            res.update(icmp_p50=statistics.median(got["icmp"]) if got["icmp"] else float("nan"),
                       icmp_received=len(got["icmp"]))
            log("  %s: ICMP RTT p50 %.3f ms (%d answered)"
                % (kind, res["icmp_p50"], res["icmp_received"]))


# The gateway's share of a UDP echo, from the kernel's own timestamps where the gateway
# namespace takes in and sends out each datagram (perf's net tracepoints, on all CPUs): from
# the request's arrival on peer0 to its departure on inet0, plus from the reply's arrival on
# inet0 to its departure on peer0. The rest of the round trip (client, peer, server, links)
# is the same path for every gateway. Measured the same way: a null relay (socat in the gateway
# namespace, relaying plain UDP to the same echo server: no tunnel, no crypto), which is
# about what any user-space process pays in this rig to be woken once each way.
SHARE_ROUNDS, SHARE_ECHOES = 3, 300
ETHERNET_HEADER = 14


def ipv4_udp_len(payload):
    return 20 + 8 + payload


def wireguard_len(inner):
    """An IPv4 packet of `inner` bytes, as a WireGuard data message in an IPv4 datagram:
    16 bytes of header, the packet padded to 16, a 16-byte tag."""
    return ipv4_udp_len(16 + (inner + 15) // 16 * 16 + 16)


def net_events(data):
    """(monotonic seconds, tracepoint, device, length) from a `perf record` of the net
    tracepoints."""
    out = subprocess.run(["perf", "script", "-i", data, "--ns", "-F", "time,event,trace"],
                         capture_output=True, text=True).stdout
    return [(float(m.group(1)), m.group(2), m.group(3), int(m.group(4)))
            for m in re.finditer(r"(\d+\.\d+):\s+net:(\w+):\s+dev=(\S+) .*?len=(\d+)", out)]


def echo_shares(events, t0, t1, outer, inner):
    """(forward, reverse) seconds in the gateway namespace for each echo between t0 and t1:
    the request arrives on peer0 as `outer` bytes and leaves on inet0 as `inner`, the reply
    the other way. Each request is paired with the next events in order; a pairing that
    spans more than 10 ms (a lost datagram) is dropped."""
    def times(point, dev, length):
        return [t for t, p, d, n in events if t0 <= t <= t1 and p == point and d == dev
                and n == length]
    legs = (times("netif_receive_skb", "peer0", outer),
            times("net_dev_xmit", "inet0", inner + ETHERNET_HEADER),
            times("netif_receive_skb", "inet0", inner),
            times("net_dev_xmit", "peer0", outer + ETHERNET_HEADER))
    shares, at = [], [0, 0, 0]
    for start in legs[0]:
        stamps = [start]
        for i, leg in enumerate(legs[1:]):
            while at[i] < len(leg) and leg[at[i]] < stamps[-1]:
                at[i] += 1
            if at[i] == len(leg):
                return shares
            stamps.append(leg[at[i]])
        if stamps[3] - stamps[0] < 0.01:
            shares.append((stamps[1] - stamps[0], stamps[3] - stamps[2]))
    return shares


def median_us(seconds):
    return statistics.median(seconds) * 1e6


def measure_share(topos, results, log):
    """UDP echoes through every gateway and through the null relay, SHARE_ROUNDS rounds in
    alternating order under one system-wide `perf record`; each one's median share of an
    echo, both ways and each way, and the median round trip the client saw meanwhile."""
    if not shutil.which("perf") or not shutil.which("socat"):
        log("  skipped: needs perf (Debian: linux-perf) and socat")
        return
    relay_kind = "ours" if "ours" in topos else next(iter(topos))
    relay_topo = topos[relay_kind]
    relay = relay_topo.spawn("null-relay", "gw", [
        "socat", "UDP4-LISTEN:%d,bind=%s" % (NULL_RELAY_PORT, GW_UNDERLAY_V4),
        "UDP4:%s:%d" % (INET_V4, UDP_ECHO_PORT)])
    wait(lambda: (":%d " % NULL_RELAY_PORT) in relay_topo.sh("ss", "-Hunl", ns="gw"), 10,
         "socat to bind")
    tunnel, plain = wireguard_len(ipv4_udp_len(UDP_ECHO_SIZE)), ipv4_udp_len(UDP_ECHO_SIZE)
    runs = [(kind, topo, topo.gateway_pid, INET_V4, UDP_ECHO_PORT, tunnel)
            for kind, topo in topos.items()]
    runs.append(("null", relay_topo, relay.pid, GW_UNDERLAY_V4, NULL_RELAY_PORT, plain))
    data = os.path.join(relay_topo.log_dir, "share.data")
    perf = subprocess.Popen(["perf", "record", "-a", "-k", "CLOCK_MONOTONIC", "-o", data,
                             "-e", "net:netif_receive_skb,net:net_dev_xmit"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    windows = []
    try:
        time.sleep(1.5)  # perf takes a moment before it records
        for r in range(SHARE_ROUNDS):
            for name, topo, pid, host, port, outer in (runs if r % 2 == 0 else runs[::-1]):
                t0, cpu0 = time.clock_gettime(time.CLOCK_MONOTONIC), run_seconds(pid)
                rtts, _ = udp_times(topo, SHARE_ECHOES, host, port)
                t1, cpu1 = time.clock_gettime(time.CLOCK_MONOTONIC), run_seconds(pid)
                windows.append((name, t0, t1, outer, rtts, cpu1 - cpu0))
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
        relay.terminate()
    events = net_events(data)
    for name in [run[0] for run in runs]:
        shares, rtts, cpu = [], [], 0.0
        for kind, t0, t1, outer, got, seconds in windows:
            if kind == name:
                shares += echo_shares(events, t0, t1, outer, plain)
                rtts += got
                cpu += seconds
        if not shares:
            log("  %s: no echo found in the trace" % name)
            continue
        res, prefix = (results[relay_kind], "null_") if name == "null" else (results[name], "")
        res.update({prefix + "share_p50": median_us([f + r for f, r in shares]),
                    prefix + "share_forward_p50": median_us([f for f, _ in shares]),
                    prefix + "share_reverse_p50": median_us([r for _, r in shares]),
                    prefix + "share_echoes": len(shares),
                    prefix + "share_rtt_p50": statistics.median(rtts),
                    prefix + "share_cpu_per_echo": cpu / len(rtts) * 1e6})
        if name != "null":  # the relay's round trip has no tunnel: its rest is another path
            res["share_rest_p50"] = res["share_rtt_p50"] - res["share_p50"]
        log("  %s: %.0f us of a %.0f us echo in the gateway namespace (%.0f in, %.0f back; "
            "%d echoes), %.0f us of CPU per echo"
            % (name, res[prefix + "share_p50"], res[prefix + "share_rtt_p50"],
               res[prefix + "share_forward_p50"], res[prefix + "share_reverse_p50"],
               len(shares), res[prefix + "share_cpu_per_echo"]))
    base = results.get("baseline", {})
    if "ours" in results and "share_p50" in base:
        # With the same rest R for both, (R + ours) / (R + B) <= 0.8 needs this much or less.
        results["ours"]["share_for_0_8"] = 0.8 * base["share_p50"] - 0.2 * base["share_rest_p50"]


THROUGHPUT_ROWS = (("up1", False, 1), ("up4", False, 4), ("down1", True, 1), ("down4", True, 4))
THROUGHPUT_ROUNDS = 3


def iperf_once(topo, key, reverse, streams, seconds, profile, log):
    """One iperf3 run through `topo`: throughput and what it cost, as a dict. With
    `profile`, a 4-stream run of ours is recorded with `perf` too."""
    pid = topo.gateway_pid
    argv = ["iperf3", "-c", INET_V4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
            "-P", str(streams)] + (["-R"] if reverse else [])
    cpu0, peer0 = cpu_seconds(pid), cpu_seconds(topo.peer_wg_pid)
    threads0 = thread_cpu_seconds(pid)
    switches0 = context_switches(pid)
    drops0 = udp_receive_drops(topo, "gw"), udp_receive_drops(topo, "peer")
    perf = None
    if profile and topo.kind == "ours" and streams == 4:
        data = os.path.join(topo.log_dir, "perf-%s.data" % key)
        perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", data,
                                 "-p", str(pid), "--", "sleep", str(seconds)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = topo.sh(*argv, ns="peer", timeout=seconds + 30)
    run = {}
    if perf:
        perf.wait(30)
        run["perf_top"] = perf_top(data)
        log("  perf, gateway during %s (self time, >= 1%%):\n    %s"
            % (key, "\n    ".join(run["perf_top"])))
    cpu1, peer1 = cpu_seconds(pid), cpu_seconds(topo.peer_wg_pid)
    received = json.loads(out)["end"]
    run.update(
        gb=received["sum_received"]["bytes"] / 1e9,
        gbps=received["sum_received"]["bits_per_second"] / 1e9,
        cpu=cpu1 - cpu0,
        peer_cpu=peer1 - peer0,
        busiest=busiest_thread_delta(threads0, thread_cpu_seconds(pid)),
        switches=context_switches(pid) - switches0,
        retransmits=received.get("sum_sent", {}).get("retransmits") or 0,
        tunnel_drops=udp_receive_drops(topo, "gw") - drops0[0],
        peer_drops=udp_receive_drops(topo, "peer") - drops0[1])
    log("  %s iperf3 %s: %.3f Gbit/s, gateway %.2f CPU-s/GB (peer wireguard-go %.2f), "
        "retransmits %d, tunnel socket drops %d (peer's %d)"
        % (topo.kind, key, run["gbps"], per_gb(run["cpu"], run["gb"]),
           per_gb(run["peer_cpu"], run["gb"]), run["retransmits"], run["tunnel_drops"],
           run["peer_drops"]))
    time.sleep(0.5)
    return run


def per_gb(seconds, gb):
    return seconds / gb if gb else float("nan")


def perf_top(data):
    """The top of a `perf record` profile: self time by object, then by symbol (>= 1%)."""
    def report(*sort):
        out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort",
                              ",".join(sort), "--stdio", "-g", "none", "--percent-limit", "1"],
                             capture_output=True, text=True).stdout
        return [re.sub(r"[\s-]+$", "", l) for l in out.splitlines()
                if l.strip() and not l.startswith("#")]
    return (report("dso")[:5] + [""] + report("dso", "symbol"))[:30]


def measure_throughput(topos, results, args, log):
    """iperf3 through every gateway, each row in THROUGHPUT_ROUNDS rounds that alternate
    between the gateways, one gateway busy at a time. Throughput is each row's median
    round; CPU per GB is the CPU of all its rounds over all their bytes (and the busiest
    thread's, summed the same way), so that the machine's drift during the run weighs on
    both gateways alike, as in measure_latency."""
    runs = {kind: {key: [] for key, _, _ in THROUGHPUT_ROWS} for kind in topos}
    for r in range(THROUGHPUT_ROUNDS):
        order = list(topos) if r % 2 == 0 else list(reversed(list(topos)))
        for key, reverse, streams in THROUGHPUT_ROWS:
            for kind in order:
                runs[kind][key].append(iperf_once(topos[kind], key, reverse, streams,
                                                  args.seconds, args.perf and r == 0, log))
        log("  throughput round %d of %d done" % (r + 1, THROUGHPUT_ROUNDS))
    for kind, rows in runs.items():
        res = results[kind]
        for key, got in rows.items():
            gb = sum(run["gb"] for run in got)
            res[key + "_gbps"] = statistics.median(run["gbps"] for run in got)
            res[key + "_gbps_rounds"] = [round(run["gbps"], 3) for run in got]
            res[key + "_cpu_per_gb"] = per_gb(sum(run["cpu"] for run in got), gb)
            res[key + "_peer_cpu_per_gb"] = per_gb(sum(run["peer_cpu"] for run in got), gb)
            res[key + "_busiest_thread_cpu_per_gb"] = per_gb(
                sum(run["busiest"] for run in got), gb)
            # Per MB: about 700 full-size packets.
            res[key + "_switches_per_mb"] = per_gb(sum(run["switches"] for run in got), gb) / 1e3
            for total in ("retransmits", "tunnel_drops", "peer_drops"):
                res[key + "_" + total] = sum(run[total] for run in got)
            if got[0].get("perf_top"):
                res["perf_top_" + key] = got[0]["perf_top"]
            log("  %s %s: median %.3f Gbit/s (rounds %s), %.2f CPU-s/GB"
                % (kind, key, res[key + "_gbps"], res[key + "_gbps_rounds"],
                   res[key + "_cpu_per_gb"]))


# The floor rows: iperf3 from the gateway namespace itself, with no tunnel and no gateway,
# paced to the rate our gateway reached in the same row, writing (or reading) about what the
# gateway does per wake-up: some ten 1380-byte segments per host socket write on the way up,
# up to 64 KiB per read on the way down.
FLOOR_WRITE, FLOOR_READ = "16K", "64K"


def measure_floor(topo, res, seconds, log):
    """The kernel's own cost, in this rig, of the host side of each throughput row: the same
    bytes through a TCP socket in the gateway namespace at our gateway's median rate, with
    the iperf3 client's CPU (user + system, from its own report) per GB. veth hands each
    packet to the receiving namespace in the sender's context, so this counts the iperf3
    server's TCP receive work too, as the gateway's figure does."""
    for key, reverse, streams in THROUGHPUT_ROWS:
        rate = res.get(key + "_gbps")
        if not rate:
            continue
        per_stream = "%dM" % max(1, int(rate * 1000 / streams))
        argv = ["iperf3", "-c", INET_V4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                "-P", str(streams), "-b", per_stream,
                "-l", FLOOR_READ if reverse else FLOOR_WRITE] + (["-R"] if reverse else [])
        end = json.loads(topo.sh(*argv, ns="gw", timeout=seconds + 30))["end"]
        received = end["sum_received"]
        cpu = end["cpu_utilization_percent"]["host_total"] / 100 * received["seconds"]
        res[key + "_floor_gbps"] = received["bits_per_second"] / 1e9
        res[key + "_floor_cpu_per_gb"] = per_gb(cpu, received["bytes"] / 1e9)
        log("  floor %s: iperf3 in the gateway namespace at %s/stream: %.3f Gbit/s, "
            "%.2f CPU-s/GB" % (key, per_stream, res[key + "_floor_gbps"],
                               res[key + "_floor_cpu_per_gb"]))
        time.sleep(0.5)


def measure_echo(topo, conns, res, log):
    drops0 = udp_receive_drops(topo, "gw"), udp_receive_drops(topo, "peer")
    out = client(topo, ["echo", INET_V4, str(conns), str(1 << 20)], 300)
    last = out.strip().splitlines()[-1].split()
    res.update(echo_conns=conns, echo_ok=int(last[1]), echo_s=float(last[2]),
               echo_tunnel_drops=udp_receive_drops(topo, "gw") - drops0[0],
               echo_peer_drops=udp_receive_drops(topo, "peer") - drops0[1])
    log("  %d x 1 MB echoes: %d byte-exact in %.1f s, tunnel socket drops %d (peer's %d)"
        % (conns, res["echo_ok"], res["echo_s"], res["echo_tunnel_drops"],
           res["echo_peer_drops"]))


def run_all(kinds, args, log_dir, log):
    """Brings up a topology for each gateway in `kinds`, all at once, and measures them:
    each gateway's idle connections, then the latencies and the throughput in interleaved
    rounds, then each gateway's echoes (one gateway busy at a time). Returns the results by
    kind."""
    topos, results = {}, {}
    try:
        for kind in kinds:
            topo = Topology(kind, args.binary, args.gateway_arg, log_dir)
            topos[kind] = topo
            results[kind] = {"kind": kind}
            topo.up()
            results[kind]["rss_start"] = rss_bytes(topo.gateway_pid)
        for kind, topo in topos.items():
            log("== %s ==" % NAMES[kind])
            if "idle" in args.measure:
                measure_idle(topo, args.idle, results[kind], log)
        log("== latency, both gateways in turn ==")
        measure_latency(topos, results, args, log)
        if "share" in args.measure:
            log("== the gateway's share of a UDP echo, and a null relay's ==")
            measure_share(topos, results, log)
        if "iperf" in args.measure:
            log("== throughput, both gateways in turn ==")
            measure_throughput(topos, results, args, log)
            if "ours" in topos:
                log("== kernel floor: the host side alone, at our rates ==")
                measure_floor(topos["ours"], results["ours"], args.seconds, log)
        for kind, topo in topos.items():
            log("== %s ==" % NAMES[kind])
            res = results[kind]
            if "echo" in args.measure:
                measure_echo(topo, args.echoes, res, log)
            res["rss_end"] = rss_bytes(topo.gateway_pid)
            res["gateway_alive"] = topo.procs and all(
                p.poll() is None for p in topo.procs if p.pid == topo.gateway_pid)
    finally:
        for topo in topos.values():
            topo.close()
    return results


NAMES = {"ours": "wgslirpy",
         "baseline": "baseline (wireguard-go + kernel forwarding + nftables masquerade)"}


def fmt(v, spec):
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def ratio(a, b):
    if a is None or b is None or not b or a != a or b != b:
        return "n/a"
    return "%.2f" % (a / b)


def report(ours, base, args, started):
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    lines = [
        "# wgslirpy benchmark: %s" % started.strftime("%Y-%m-%d %H:%M UTC"),
        "",
        "Commit %s%s, kernel %s, %d CPUs. Extra wgslirpy arguments: `%s`; "
        "counts: %d idle connections, %d short connections, %d UDP echoes, %d pings, "
        "iperf3 -t %d."
        % (commit, " (with local changes)" if dirty else "", platform.release(),
           os.cpu_count(), " ".join(args.gateway_arg) or "none", args.idle, args.short,
           args.udp, args.icmp, args.seconds),
        "Baseline: wireguard-go in the gateway namespace, kernel forwarding, nftables "
        "masquerade; its CPU is the wireguard-go process only (kernel forwarding and NAT "
        "run in softirq and are not counted), and its RSS and descriptors are wireguard-go's, "
        "which keeps no per-connection state (the kernel's conntrack entries are not in any "
        "RSS), so its memory rows are context, not a like-for-like comparison. Both serve "
        "the same kind of wireguard-go peer, whose CPU is listed below.",
        "Ratios are ours / baseline. Targets: issue 8 (and issue 3 for the short connection "
        "median and RSS per idle connection). The latency rows come from %d rounds that "
        "alternate between the two gateways; each round's short-connection median is in the "
        "raw results (`short_round_p50`). So do the throughput rows, from %d rounds of each "
        "iperf3 run: throughput is the median round (every round in `*_gbps_rounds`), CPU "
        "per GB all rounds' CPU over all their bytes, and the retransmits and drops are "
        "summed over the rounds." % (LATENCY_ROUNDS, THROUGHPUT_ROUNDS),
        "",
        "| measure | wgslirpy | baseline | ratio | target |",
        "|---|---|---|---|---|",
    ]

    def row(name, key, spec, target="", scale=1.0, show_ratio=True):
        a, b = ours.get(key), base.get(key)
        if scale != 1.0:
            a = a * scale if isinstance(a, (int, float)) else a
            b = b * scale if isinstance(b, (int, float)) else b
        lines.append("| %s | %s | %s | %s | %s |" % (
            name, fmt(a, spec), fmt(b, spec), ratio(a, b) if show_ratio else "", target))

    for key, name in (("up1", "peer → internet, 1 stream"), ("up4", "peer → internet, 4 streams"),
                      ("down1", "internet → peer, 1 stream"),
                      ("down4", "internet → peer, 4 streams")):
        row("TCP %s (Gbit/s)" % name, key + "_gbps", ".3f", "ratio ≥ 1.5")
    for key, name in (("up1", "peer → internet, 1 stream"), ("up4", "peer → internet, 4 streams"),
                      ("down1", "internet → peer, 1 stream"),
                      ("down4", "internet → peer, 4 streams")):
        row("gateway CPU-s per GB, %s" % name, key + "_cpu_per_gb", ".2f", "≤ 2.0 (ours)")
    for key, name in (("up1", "peer → internet, 1 stream"), ("up4", "peer → internet, 4 streams"),
                      ("down1", "internet → peer, 1 stream"),
                      ("down4", "internet → peer, 4 streams")):
        row("kernel floor, CPU-s per GB, %s (see below)" % name, key + "_floor_cpu_per_gb",
            ".2f", show_ratio=False)
    for key, name in (("up4", "peer → internet, 4 streams"),
                      ("down4", "internet → peer, 4 streams")):
        row("busiest gateway thread, CPU-s per GB, %s" % name,
            key + "_busiest_thread_cpu_per_gb", ".2f")
    for key, name in (("up4", "peer → internet, 4 streams"),
                      ("down4", "internet → peer, 4 streams")):
        row("gateway context switches per MB, %s" % name, key + "_switches_per_mb", ".1f")
    row("short TCP connection, median (ms)", "short_p50", ".3f", "ratio ≤ 0.8 (issue 3: ≤ 1.0)")
    row("short TCP connection, p99 (ms)", "short_p99", ".3f")
    row("UDP echo RTT, p50 (µs)", "udp_p50", ".0f", "ratio ≤ 0.8")
    row("UDP echo RTT, p99 (µs)", "udp_p99", ".0f")
    row("ICMP echo RTT, p50 (ms)", "icmp_p50", ".3f")
    row("UDP echo: time in the gateway namespace, p50 (µs, see below)", "share_p50", ".0f")
    row("… of it, request in → out (µs)", "share_forward_p50", ".0f")
    row("… of it, reply in → out (µs)", "share_reverse_p50", ".0f")
    row("UDP echo: the rest of the round trip, p50 (µs)", "share_rest_p50", ".0f")
    row("UDP echo: gateway CPU per echo (µs)", "share_cpu_per_echo", ".0f")
    row("null relay (socat, no tunnel): time in the gateway namespace, p50 (µs)",
        "null_share_p50", ".0f", show_ratio=False)
    row("null relay: its CPU per echo (µs)", "null_share_cpu_per_echo", ".0f",
        show_ratio=False)
    row("our time in the gateway namespace that a UDP echo ratio of 0.8 would need (µs)",
        "share_for_0_8", ".0f", show_ratio=False)
    row("gateway RSS at start (MiB)", "idle_rss0", ".1f", scale=1 / 2**20)
    row("gateway RSS with %d idle connections (MiB)" % args.idle, "idle_rss1", ".1f",
        scale=1 / 2**20)
    row("gateway RSS per idle connection (KiB)", "idle_per_conn", ".2f", "≤ 16 (ours)",
        scale=1 / 1024)
    row("gateway RSS after they closed (MiB)", "idle_rss2", ".1f", scale=1 / 2**20)
    row("idle connections opened", "idle_opened", "d", show_ratio=False)
    row("idle connections that echoed afterwards", "idle_echoed", "d", "all",
        show_ratio=False)
    row("gateway fds: start", "idle_fds0", "d", show_ratio=False)
    row("gateway fds: with idle connections", "idle_fds1", "d", show_ratio=False)
    row("gateway fds: after they closed", "idle_fds2", "d", "= start", show_ratio=False)
    row("%d concurrent 1 MB echoes, byte-exact" % args.echoes, "echo_ok", "d", "all",
        show_ratio=False)
    row("%d concurrent 1 MB echoes, seconds" % args.echoes, "echo_s", ".1f")
    lines += [
        "",
        "Context (not targets): the peer's wireguard-go CPU-s per GB, and datagrams dropped "
        "for a full socket receive buffer (UdpRcvbufErrors) by the gateway's tunnel socket "
        "and by the peer's, same runs:",
        "",
        "| run | peer CPU-s/GB, wgslirpy | peer CPU-s/GB, baseline "
        "| gateway socket drops, wgslirpy | gateway socket drops, baseline "
        "| peer socket drops, wgslirpy | peer socket drops, baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("up1", "up4", "down1", "down4", "echo"):
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            key, fmt(ours.get(key + "_peer_cpu_per_gb"), ".2f"),
            fmt(base.get(key + "_peer_cpu_per_gb"), ".2f"),
            fmt(ours.get(key + "_tunnel_drops"), "d"), fmt(base.get(key + "_tunnel_drops"), "d"),
            fmt(ours.get(key + "_peer_drops"), "d"), fmt(base.get(key + "_peer_drops"), "d")))
    lines += [
        "",
        "Kernel floor (in the wgslirpy column): iperf3 run from the gateway namespace itself, "
        "with no tunnel and no gateway, paced to the rate wgslirpy reached in the same row, "
        "in %s writes up and %s reads down; its CPU (user + system) per GB. That is what the "
        "host side of each row costs any process in this rig, the receiving namespace's TCP "
        "work included (veth charges it to the sender), before a byte of the tunnel side: the "
        "UDP socket, ChaCha20-Poly1305 (about 0.6 CPU-s per GB) and the ACKs." % (
            FLOOR_WRITE, FLOOR_READ),
    ]
    lines += [
        "",
        "Time in the gateway namespace: from the kernel's timestamps (perf's net tracepoints) "
        "where each UDP echo's request enters the gateway namespace from the peer and leaves "
        "it toward the server, plus the same for the reply, per echo, in %d rounds of %d "
        "echoes alternating between the gateways and a null relay (socat in our gateway "
        "namespace relaying plain UDP to the same server: no tunnel, no crypto, one wake-up "
        "each way). The rest of the round trip (client, peer, server, links) is the same path "
        "for every gateway, though it moves with the machine's load, so with the baseline's "
        "share B and rest R, a ratio of 0.8 needs our share at or below about 0.8·B − 0.2·R. "
        "CPU per echo: the process's threads' run time (schedstat) over the same echoes."
        % (SHARE_ROUNDS, SHARE_ECHOES),
    ]
    for key, what in (("up4", "upload"), ("down4", "download")):
        if ours.get("perf_top_" + key):
            lines += ["", "perf, wgslirpy during the 4-stream %s (self time by object, then by "
                      "symbol >= 1%%):" % what, "", "```"] + ours["perf_top_" + key] + ["```"]
    lines += ["", "Raw results:", "", "```json",
              json.dumps({"ours": ours, "baseline": base}, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


MEASURES = ("idle", "short", "udp", "icmp", "share", "iperf", "echo")


def orchestrate(argv):
    ap = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/wgslirpy"))
    ap.add_argument("--gateway-arg", action="append", default=[],
                    help="extra wgslirpy argument (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--perf", action="store_true",
                    help="profile wgslirpy with perf during the 4-stream upload and download")
    ap.add_argument("--only", choices=["ours", "baseline"], help="measure one gateway only")
    ap.add_argument("--measure", default=",".join(MEASURES),
                    type=lambda v: v.split(","),
                    help="comma-separated subset of %s (default: all)" % ",".join(MEASURES))
    ap.add_argument("--out", help="results file (default bench/results/<date>-<commit>.md)")
    args = ap.parse_args(argv)
    unknown = set(args.measure) - set(MEASURES)
    if unknown:
        ap.error("unknown --measure: %s" % ",".join(sorted(unknown)))
    args.idle, args.short, args.udp, args.icmp, args.seconds, args.echoes = (
        (1000, 100, 200, 20, 2, 20) if args.quick else (10000, 500, 1000, 100, 4, 200))
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces)")
    raise_nofile()
    started = datetime.datetime.now(datetime.timezone.utc)
    log_dir = "/tmp/wgslirpy-bench-%d" % os.getpid()
    os.makedirs(log_dir, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    # Ctrl-C and SIGTERM unwind through the `finally` blocks that clean up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    kinds = [kind for kind in ("ours", "baseline") if args.only in (None, kind)]
    results = run_all(kinds, args, log_dir, log)
    text = report(results.get("ours", {}), results.get("baseline", {}), args, started)
    out = args.out or os.path.join(HERE, "results", "%s-%s.md" % (
        started.strftime("%Y%m%d-%H%M"),
        subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True).stdout.strip() or "unknown"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print()
    print(text.split("\nRaw results:")[0])
    print("written to", out, "; logs in", log_dir)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve_main())
    elif sys.argv[1:2] == ["client"]:
        client_main(sys.argv[2:])
    else:
        orchestrate(sys.argv[1:])
