//! Python scripts for the hostile-input and flood tests (`e2e_hostile.rs`), run in the
//! peer namespace. They build packets by hand, so nothing beyond python3 is needed.
//!
//! A module of `e2e_hostile.rs` (in a directory, so that cargo does not make it a test).

/// Shared helpers: checksums and IPv4/IPv6/UDP/TCP builders, and a packet socket on a
/// tunnel device (an L3 device: no link header), through which any bytes at all reach
/// the WireGuard peer and so the gateway.
pub const PACKETS_PY: &str = r#"
import os, random, socket, struct, time

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def ip4(src, dst, proto, payload, total_len=None, ihl=5, ident=0, frag=0, ttl=64, options=b""):
    hl = 20 + len(options)
    tl = hl + len(payload) if total_len is None else total_len
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tl, ident, frag, ttl, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst)) + options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload

def ip6(src, dst, nh, payload, plen=None):
    pl = len(payload) if plen is None else plen
    return struct.pack("!IHBB16s16s", 0x60000000, pl, nh, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload

def pseudo(src, dst, proto, length):
    if ":" in src:
        return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack("!IxxxB", length, proto))
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!xBH", proto, length)

def udp(src, dst, sport, dport, data, length=None):
    ln = 8 + len(data) if length is None else length
    h = struct.pack("!HHHH", sport, dport, ln, 0)
    c = csum(pseudo(src, dst, 17, 8 + len(data)) + h + data) or 0xffff
    return h[:6] + struct.pack("!H", c) + data

def tcp(src, dst, sport, dport, seq, ack, flags, data=b"", offset=5, window=65535, options=b""):
    h = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, 0) + options
    c = csum(pseudo(src, dst, 6, len(h) + len(data)) + h + data)
    return h[:16] + struct.pack("!H", c) + h[18:] + data

SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08

class Tunnel:
    """Writes raw IP packets to a tunnel device, pacing at `rate` packets a second."""
    def __init__(self, dev, rate=20000):
        self.dev = dev
        self.s4 = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.s6 = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x86dd))
        for s in (self.s4, self.s6):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.rate, self.sent, self.failed, self.start = rate, 0, 0, time.monotonic()
        self.errors = {}
    def send(self, packet):
        v6 = len(packet) > 0 and packet[0] >> 4 == 6
        s, proto = (self.s6, 0x86dd) if v6 else (self.s4, 0x0800)
        while True:
            try:
                s.sendto(packet, (self.dev, proto))
                self.sent += 1
                break
            except BlockingIOError:
                time.sleep(0.001)
            except OSError as e:
                # The kernel refuses some shapes outright (an empty packet, for one).
                self.failed += 1
                self.errors[e.errno] = self.errors.get(e.errno, 0) + 1
                break
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)
"#;

/// argv: dev src4 dst4 src6 dst6 udp_port count. Sends every kind of malformed packet the
/// issue names, then `count` random mutations of valid packets, through the tunnel device.
pub const MALFORMED_PY: &str = r#"
import sys
exec(open(sys.argv[0].rsplit("/", 1)[0] + "/packets.py").read())
dev, s4, d4, s6, d6, port, count = sys.argv[1:8]
port, count = int(port), int(count)
t = Tunnel(dev, rate=5000)
rng = random.Random(6)
u = udp(s4, d4, 40000, port, b"hello")
ok4 = ip4(s4, d4, 17, u)
cases = {}
# The packet that killed 0.2.0: IPv4 total length 0 (and its neighbours).
for tl in (0, 1, 19, 20, 21, 27, 28, len(ok4) - 1, len(ok4) + 1, 65535):
    cases["total-length-%d" % tl] = ip4(s4, d4, 17, u, total_len=tl)
# Bad IHL: below 5, and larger than the packet.
for ihl in (0, 1, 4, 6, 15):
    cases["ihl-%d" % ihl] = ip4(s4, d4, 17, u, ihl=ihl)
cases["ihl-15-short"] = ip4(s4, d4, 17, b"", ihl=15)
cases["bad-ip-checksum"] = ok4[:10] + b"\xde\xad" + ok4[12:]
cases["bad-udp-checksum"] = ip4(s4, d4, 17, u[:6] + b"\x12\x34" + u[8:])
cases["udp-length-0"] = ip4(s4, d4, 17, udp(s4, d4, 40000, port, b"x", length=0))
cases["udp-length-long"] = ip4(s4, d4, 17, udp(s4, d4, 40000, port, b"x", length=500))
cases["udp-zero-payload"] = ip4(s4, d4, 17, udp(s4, d4, 40001, port, b""))
cases["udp-truncated-header"] = ip4(s4, d4, 17, u[:5])
# TCP data offsets: 0, below 5, beyond the segment, 15; truncated header.
for off in (0, 4, 6, 15):
    cases["tcp-offset-%d" % off] = ip4(s4, d4, 6, tcp(s4, d4, 40002, 80, 1, 0, SYN, offset=off))
cases["tcp-truncated"] = ip4(s4, d4, 6, tcp(s4, d4, 40002, 80, 1, 0, SYN)[:12])
cases["tcp-bad-options"] = ip4(s4, d4, 6, tcp(s4, d4, 40002, 80, 1, 0, SYN, offset=7,
                                          options=b"\x02\x00\x03\xff\x08\x01\x00\x00"))
# Non-SYN TCP for flows that do not exist.
for name, flags in (("ack", ACK), ("fin", FIN | ACK), ("rst", RST), ("data", PSH | ACK),
                    ("synack", SYN | ACK), ("none", 0), ("all", 0xff)):
    cases["stray-" + name] = ip4(s4, d4, 6, tcp(s4, d4, 40003, 80, 7, 9, flags, b"zz"))
# Fragments: overlapping, duplicate, tiny, beyond 64 KiB, never completed.
body = udp(s4, d4, 40004, port, b"F" * 64)
for name, pieces in (
    ("overlap", [(0, 0x2000 | 0, body[:32]), (0, 0x2000 | 2, body[16:48]), (0, 4, body[32:])]),
    ("duplicate", [(0, 0x2000, body[:32]), (0, 0x2000, body[:32]), (0, 4, body[32:])]),
    ("tiny", [(0, 0x2000 | 1, b"")] + [(0, 0x2000 | i, b"12345678") for i in range(2, 40)]),
    ("too-big", [(0, 0x2000 | 8190, b"12345678"), (0, 8191, b"1234567")]),
    ("no-first", [(0, 0x2000 | 4, body[32:40])]),
):
    for i, (ident, frag, data) in enumerate(pieces):
        cases["frag-%s-%d" % (name, i)] = ip4(s4, d4, 17, data, ident=0x4242 + len(name), frag=frag)
# IPv6: lengths that lie, extension-header chains, fragments.
u6 = udp(s6, d6, 40005, port, b"hello6")
cases["v6-ok"] = ip6(s6, d6, 17, u6)
for pl in (0, 1, 7, len(u6) + 1, 65535):
    cases["v6-plen-%d" % pl] = ip6(s6, d6, 17, u6, plen=pl)
hop = bytes([17, 0]) + b"\x01\x04\0\0\0\0"
cases["v6-hop-by-hop"] = ip6(s6, d6, 0, hop + u6)
chain = b""
for i in range(40):
    chain += bytes([60, 0]) + b"\x01\x04\0\0\0\0"
cases["v6-long-chain"] = ip6(s6, d6, 60, chain + bytes([17, 0]) + b"\x01\x04\0\0\0\0" + u6)
cases["v6-chain-truncated"] = ip6(s6, d6, 60, bytes([60, 200]) + b"\0" * 6)
cases["v6-routing"] = ip6(s6, d6, 43, bytes([17, 2, 0, 1, 0, 0, 0, 0]) + b"\0" * 16 + u6)
cases["v6-frag-first"] = ip6(s6, d6, 44, bytes([17, 0, 0, 1]) + b"\0\0\0\x09" + u6[:8])
cases["v6-frag-overlap"] = ip6(s6, d6, 44, bytes([17, 0, 0, 0]) + b"\0\0\0\x09" + u6[:8])
cases["v6-frag-header-only"] = ip6(s6, d6, 44, bytes([17, 0]))
cases["v6-no-next"] = ip6(s6, d6, 59, b"")
cases["v6-icmp-short"] = ip6(s6, d6, 58, b"\x80")
cases["v4-icmp-short"] = ip4(s4, d4, 1, b"\x08")
cases["v4-unknown-proto"] = ip4(s4, d4, 253, b"hello")
# (No empty packet: WireGuard carries none; an empty data message is a keepalive.)
cases["version-5"] = b"\x50" + ok4[1:]
for name, packet in cases.items():
    for _ in range(3):
        t.send(packet)
valid = [ok4, cases["v6-ok"], ip4(s4, d4, 6, tcp(s4, d4, 40006, 80, 1, 0, SYN, offset=6,
                                                 options=b"\x02\x04\x05\x50"))]
for i in range(count):
    p = bytearray(rng.choice(valid))
    for _ in range(rng.randrange(1, 4)):
        what = rng.randrange(4)
        if what == 0 and p:
            p[rng.randrange(len(p))] ^= rng.randrange(1, 256)
        elif what == 1:
            del p[rng.randrange(len(p) + 1):]
        elif what == 2:
            p += os.urandom(rng.randrange(1, 64))
        elif len(p) >= 4:
            p[2:4] = struct.pack("!H", rng.choice([0, 1, 20, 40, rng.randrange(65536)]))
    if not p:
        continue
    if p[0] >> 4 not in (4, 6):
        p[0] = (p[0] & 0x0f) | 0x40
    t.send(bytes(p))
print("sent", t.sent, "failed", t.failed, "cases", len(cases), "errors", t.errors, flush=True)
"#;

/// argv: gw_host gw_port gw_public_key_base64 capture_file count. Sends garbage, truncated
/// WireGuard messages, handshake initiations from unknown keys (valid MAC1, so the gateway
/// does the Diffie-Hellman work before failing), and replays of captured real messages,
/// from their original source port too (raw socket).
pub const WG_GARBAGE_PY: &str = r#"
import sys
exec(open(sys.argv[0].rsplit("/", 1)[0] + "/packets.py").read())
import base64, hashlib
host, port, gw_pub, capture, count = sys.argv[1], int(sys.argv[2]), base64.b64decode(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rng = random.Random(6)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
sent = {}
def send(kind, data, sock=s, to=(host, port)):
    try:
        sock.sendto(data, to)
        sent[kind] = sent.get(kind, 0) + 1
    except OSError:
        time.sleep(0.002)
    if sum(sent.values()) % 200 == 0:
        time.sleep(0.01)
blob = os.urandom(4096)
for i in range(count):
    n = rng.choice([0, 1, 3, 4, 16, 31, 32, 33, 64, 92, 147, 148, 149, 1420]) if i % 2 else rng.randrange(1500)
    off = rng.randrange(4096 - n) if n < 4096 else 0
    d = bytearray(blob[off:off + n])
    if n >= 4 and i % 3 == 0:
        d[0:4] = bytes([rng.choice([1, 2, 3, 4]), 0, 0, 0])
    send("garbage", bytes(d))
for kind, full in ((1, 148), (2, 92), (3, 64), (4, 32)):
    for n in range(4, full + 17):
        d = bytearray(os.urandom(n))
        d[0:4] = bytes([kind, 0, 0, 0])
        send("truncated", bytes(d))
mac1_key = hashlib.blake2s(b"mac1----" + gw_pub).digest()
for i in range(2000):
    m = bytearray(148)
    m[0] = 1
    m[4:116] = os.urandom(112)
    m[116:132] = hashlib.blake2s(bytes(m[:116]), digest_size=16, key=mac1_key).digest()
    send("unknown-key-initiation", bytes(m))
captured = [bytes.fromhex(l.split()[1]) for l in open(capture) if l.startswith("udp ")]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
for _ in range(5):
    for sport, d in ((int(l.split()[2]), bytes.fromhex(l.split()[1])) for l in open(capture) if l.startswith("udp ")):
        send("replay", d)
        send("replay-original-port", struct.pack("!HHHH", sport, port, 8 + len(d), 0) + d, raw, (host, 0))
print("sent", sent, "captured", len(captured), flush=True)
"#;

/// argv: dev dport out seconds. Records the payloads of UDP datagrams leaving `dev` for
/// port `dport` (`udp <hex> <sport>` lines), for `seconds`.
pub const CAPTURE_PY: &str = r#"
import socket, struct, sys, time
dev, dport, out, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
# Outgoing packets reach only ETH_P_ALL taps, not sockets of one protocol.
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
s.bind((dev, 0x0003))
s.settimeout(0.2)
end = time.monotonic() + seconds
n = 0
with open(out, "w") as f:
    print("listening", flush=True)
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[1] != 0x0800 or addr[2] != socket.PACKET_OUTGOING or data[9] != 17:
            continue
        ihl = (data[0] & 15) * 4
        sport, dp = struct.unpack("!HH", data[ihl:ihl + 4])
        if dp == dport:
            f.write("udp %s %d\n" % (data[ihl + 8:].hex(), sport))
            f.flush()
            n += 1
print("captured", n, flush=True)
"#;

/// argv: dev kind src dst dport count rate. Floods through the tunnel device: `syn` sends
/// SYNs, `udp` one datagram per new source port (a new UDP flow each), `count` in all, at
/// `rate` packets a second. Source ports cycle through 1024..65535 (IPv4 only).
pub const FLOOD_PY: &str = r#"
import sys
exec(open(sys.argv[0].rsplit("/", 1)[0] + "/packets.py").read())
dev, kind, src, dst, dport, count, rate = sys.argv[1:8]
dport, count, rate = int(dport), int(count), int(rate)
t = Tunnel(dev, rate=rate)
start = time.monotonic()
for i in range(count):
    sport = 1024 + (i * 7 + 11) % 64511
    if kind == "syn":
        seg = tcp(src, dst, sport, dport, 1000 + i, 0, SYN, offset=6, options=b"\x02\x04\x05\x50")
        t.send(ip4(src, dst, 6, seg, ident=i & 0xffff))
    else:
        t.send(ip4(src, dst, 17, udp(src, dst, sport, dport, b"flood"), ident=i & 0xffff))
print("sent", t.sent, "failed", t.failed, "in", round(time.monotonic() - start, 2), "s", flush=True)
"#;
