"""TCP clients and servers for the end-to-end tests (e2e_tcp, e2e_tcp_scale,
e2e_forward_tcp). Subcommands:

- `echo HOST PORT BYTES CONNS TIMEOUT`: CONNS concurrent connections each send BYTES random
  bytes to an echo server, half-close, and check that exactly those bytes come back.
  Prints `ok CONNS SECONDS` or `bad ...` lines; exits 0 only if all are right.
- `greet-server PORT BYTES`: for each connection, sends BYTES bytes (a greeting) and
  half-closes at once, then reads until EOF; prints `got <n> <sha256>`.
- `greet-client HOST PORT BYTES`: reads the greeting until EOF while sending BYTES random
  bytes, then closes; prints `greeting <n> <sha256>` and `sent <n> <sha256>`.
- `flood-server PORT`: sends to each connection until it fails.
- `slow-client HOST PORT SECONDS`: connects, reads one byte, then sleeps.
- `connect HOST PORT`: prints `refused` if the connect is refused, else what happened.
- `echo-server PORT`: echoes each connection until EOF, then half-closes.
- `whoami-server PORT`: sends "<source it sees>\n", then reads until EOF and closes.
- `whoami HOST PORT CONNS`: opens CONNS connections, all held open at once, then prints
  `local <its own address> seen <what the server saw>` for each.
- `wait-close HOST PORT`: connects (the gateway accepts at once), then reads; prints
  `reset` (while connecting or reading), `eof` or `data`, and the seconds it took.
- `sink-server PORT`: reads each connection to EOF, answers `<bytes> <sha256>` and closes.
- `upload HOST PORT FILE`: sends FILE, half-closes, prints `reply <answer>`.
- `refused HOST PORT TRIES`: connects TRIES times to a closed port; prints
  `refused <ms> ...` (each connect's time to ECONNREFUSED); exits 1 on anything else.
- `pending HOST PORT N`: starts N non-blocking connects, prints `pending N`, then watches
  them for 120 s, printing `settled <i> <errno>` for any that connects or fails.
- `slow-reader HOST PORT CONNS SECONDS RATE`: CONNS connections each read RATE bytes/s
  for SECONDS; prints `read <total>`.
- `slow-sink-server PORT RATE`: reads each connection at RATE bytes/s.
- `flood-client HOST PORT CONNS SECONDS`: CONNS connections each send as fast as they can
  for SECONDS; prints `sent <total>`.
- `sequential HOST PORT COUNT`: COUNT connections one after another, each echoing 100
  bytes; prints `ok COUNT SECONDS`, or `bad ...` and exits 1.
"""
import errno, hashlib, os, select, socket, sys, threading, time

def show(addr):
    host = addr[0]
    if host.startswith("::ffff:"):
        host = host[7:]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, addr[1])

def listen(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(512)
    return s

def serve(port, handler):
    s = listen(port)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()

def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def read_all(c):
    h, n = hashlib.sha256(), 0
    while True:
        d = c.recv(65536)
        if not d:
            return n, h.hexdigest()
        n += len(d)
        h.update(d)

def echo_handler(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    finally:
        c.close()

def whoami_handler(c):
    c.sendall((show(c.getpeername()) + "\n").encode())
    read_all(c)
    c.close()

def echo_one(host, port, size, timeout, results, i):
    try:
        data = os.urandom(size)
        c = socket.create_connection((host, port), timeout=timeout)
        def send():
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        got = bytearray()
        while True:
            d = c.recv(65536)
            if not d:
                break
            got += d
        t.join()
        c.close()
        results[i] = "ok" if bytes(got) == data else "bad %d: %d bytes back" % (i, len(got))
    except Exception as e:
        results[i] = "bad %d: %r" % (i, e)

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "echo-server":
    serve(int(sys.argv[2]), echo_handler)
elif cmd == "whoami-server":
    serve(int(sys.argv[2]), whoami_handler)
elif cmd == "greet-server":
    size = int(sys.argv[3])
    def handle(c):
        c.sendall(b"G" * size)
        c.shutdown(socket.SHUT_WR)
        n, digest = read_all(c)
        print("got", n, digest, flush=True)
        c.close()
    serve(int(sys.argv[2]), handle)
elif cmd == "echo":
    host, port, size, conns, timeout = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    results = [None] * conns
    start = time.time()
    threads = [threading.Thread(target=echo_one, args=(host, port, size, timeout, results, i)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = [r for r in results if r != "ok"]
    for r in bad[:20]:
        print(r, flush=True)
    print("ok" if not bad else "failed", conns - len(bad), "%.2f" % (time.time() - start), flush=True)
    sys.exit(1 if bad else 0)
elif cmd == "whoami":
    host, port, conns = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    socks = [socket.create_connection((host, port), timeout=20) for _ in range(conns)]
    for s in socks:
        line = b""
        while not line.endswith(b"\n"):
            d = s.recv(100)
            if not d:
                break
            line += d
        print("local", show(s.getsockname()), "seen", line.decode().strip() or "nothing", flush=True)
    for s in socks:
        s.close()
elif cmd == "greet-client":
    host, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    data = os.urandom(size)
    c = socket.create_connection((host, port), timeout=20)
    result = {}
    def reader():
        result["greeting"] = read_all(c)
    t = threading.Thread(target=reader)
    t.start()
    # Send in pieces, so that most of it goes after the server's FIN has arrived.
    for i in range(0, size, 65536):
        c.sendall(data[i:i + 65536])
        if i == 0:
            time.sleep(0.3)
    t.join()
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    c.close()
    print("greeting", *result["greeting"], flush=True)
    print("sent", size, hashlib.sha256(data).hexdigest(), flush=True)
elif cmd == "wait-close":
    start = time.time()
    try:
        # The reset may come before the connect call has even returned.
        c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
        what = "data" if c.recv(100) else "eof"
    except ConnectionResetError:
        what = "reset"
    print(what, "%.2f" % (time.time() - start), flush=True)
elif cmd == "flood-server":
    chunk = b"F" * 65536
    def handle(c):
        try:
            while True:
                c.sendall(chunk)
        except OSError:
            pass
    serve(int(sys.argv[2]), handle)
elif cmd == "connect":
    try:
        socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5).close()
        print("connected", flush=True)
    except ConnectionRefusedError:
        print("refused", flush=True)
    except OSError as e:
        print("error", repr(e), flush=True)
elif cmd == "slow-client":
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    c.recv(1)
    print("connected", flush=True)
    time.sleep(float(sys.argv[4]))
elif cmd == "sink-server":
    def handle(c):
        h, n = hashlib.sha256(), 0
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            n += len(d)
            h.update(d)
        c.sendall(b"%d %s\n" % (n, h.hexdigest().encode()))
        c.close()
    serve(int(args[0]), handle)
elif cmd == "upload":
    c = socket.create_connection((args[0], int(args[1])), timeout=120)
    with open(args[2], "rb") as f:
        c.sendfile(f)
    c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = c.recv(4096)
        if not d:
            break
        got += d
    print("reply", got.decode().strip(), flush=True)
elif cmd == "refused":
    host, port, tries = args[0], int(args[1]), int(args[2])
    times = []
    for _ in range(tries):
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.settimeout(5)
        t0 = time.perf_counter()
        try:
            s.connect((host, port))
            print("connected", flush=True)
            sys.exit(1)
        except ConnectionRefusedError:
            times.append((time.perf_counter() - t0) * 1000)
        except OSError as e:
            print("error", repr(e), flush=True)
            sys.exit(1)
        s.close()
        time.sleep(0.05)
    print("refused", " ".join("%.2f" % t for t in times), flush=True)
elif cmd == "pending":
    host, port, n = args[0], int(args[1]), int(args[2])
    socks = []
    for _ in range(n):
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.setblocking(False)
        assert s.connect_ex((host, port)) == errno.EINPROGRESS
        socks.append(s)
    print("pending", n, flush=True)
    open_ = dict(enumerate(socks))
    deadline = time.time() + 120
    while open_ and time.time() < deadline:
        _, w, _ = select.select([], list(open_.values()), [], 1)
        for i, s in list(open_.items()):
            if s in w:
                print("settled", i, s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), flush=True)
                del open_[i]
elif cmd == "slow-reader":
    host, port, conns, seconds, rate = args[0], int(args[1]), int(args[2]), float(args[3]), int(args[4])
    total = [0] * conns
    def read(i):
        c = socket.create_connection((host, port), timeout=30)
        end = time.time() + seconds
        while time.time() < end:
            total[i] += len(c.recv(rate // 10))
            time.sleep(0.1)
        c.close()
    ts = [threading.Thread(target=read, args=(i,)) for i in range(conns)]
    for t in ts:
        t.start()
    print("connected", flush=True)
    for t in ts:
        t.join()
    print("read", sum(total), flush=True)
elif cmd == "slow-sink-server":
    rate = int(args[1])
    def handle(c):
        try:
            while c.recv(rate // 10):
                time.sleep(0.1)
        except OSError:
            pass
    serve(int(args[0]), handle)
elif cmd == "flood-client":
    host, port, conns, seconds = args[0], int(args[1]), int(args[2]), float(args[3])
    total = [0] * conns
    chunk = b"U" * 65536
    def send(i):
        c = socket.create_connection((host, port), timeout=30)
        c.settimeout(0.2)
        end = time.time() + seconds
        while time.time() < end:
            try:
                total[i] += c.send(chunk)
            except socket.timeout:
                pass
        c.close()
    ts = [threading.Thread(target=send, args=(i,)) for i in range(conns)]
    for t in ts:
        t.start()
    print("connected", flush=True)
    for t in ts:
        t.join()
    print("sent", sum(total), flush=True)
elif cmd == "sequential":
    host, port, count = args[0], int(args[1]), int(args[2])
    start = time.time()
    for i in range(count):
        msg = b"%06d" % i * 16 + b"\n" * 4
        try:
            c = socket.create_connection((host, port), timeout=10)
            c.sendall(msg)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                d = c.recv(4096)
                if not d:
                    break
                got += d
            c.close()
        except OSError as e:
            print("bad", i, repr(e), flush=True)
            sys.exit(1)
        if got != msg:
            print("bad", i, "echoed", len(got), "bytes", flush=True)
            sys.exit(1)
    print("ok", count, "%.2f" % (time.time() - start), flush=True)
else:
    sys.exit("unknown subcommand " + cmd)
