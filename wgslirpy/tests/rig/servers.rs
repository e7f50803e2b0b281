//! The internet-side servers and the python server/client scripts.

use super::*;

pub(super) const UDP_ECHO_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    print(host, addr[1], len(data), flush=True)
    s.sendto(data, addr)
"#;

pub(super) const TCP_ECHO_PY: &str = r#"
import socket, socketserver, sys
class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    # socketserver listens with a backlog of 5. 200 connects at once overflowed it and the
    # kernel sent SYN cookies; a connection whose cookie ACK finds the accept queue full is
    # reset when its data comes (the likely cause of two resets in one run of six).
    request_queue_size = 1024
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        host = self.client_address[0]
        host = host[7:] if host.startswith("::ffff:") else host
        total = 0
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            total += len(data)
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)
        print(host, self.client_address[1], total, flush=True)
Server(("::", int(sys.argv[1])), Echo).serve_forever()
"#;

/// argv: host port payload_hex attempts per_attempt_timeout_secs [source_ip]. Prints `reply
/// <host> <port> <hex>` and exits 0, or exits 1 after all attempts time out.
pub(super) const UDP_CLIENT_PY: &str = r#"
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
attempts, timeout = int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
if len(sys.argv) > 6:
    s.bind((sys.argv[6], 0))
s.settimeout(timeout)
for i in range(attempts):
    s.sendto(payload, (host, port))
    try:
        data, addr = s.recvfrom(65535)
        print("reply", addr[0], addr[1], data.hex(), flush=True)
        sys.exit(0)
    except socket.timeout:
        print("attempt", i + 1, "timed out", file=sys.stderr, flush=True)
sys.exit(1)
"#;

/// argv: url timeout_secs. Prints `status <code>` then `body <hex>`.
pub(super) const HTTP_GET_PY: &str = r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
    code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
print("status", code, flush=True)
print("body", body.hex(), flush=True)
"#;

/// argv: host port payload_hex timeout_secs. Sends, half-closes, prints `reply <hex>` of
/// everything read until EOF.
pub(super) const TCP_CLIENT_PY: &str = r#"
import socket, sys
host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=timeout)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    got += d
print("reply", got.hex(), flush=True)
"#;

impl Rig {
    pub(super) fn start_server(&mut self, server: Server) {
        let inet = self.inet.clone();
        let py = python();
        let (name, proto, port) = match server {
            Server::UdpEcho => ("udp-echo", Proto::Udp, UDP_ECHO_PORT),
            Server::TcpEcho => ("tcp-echo", Proto::TcpListen, TCP_ECHO_PORT),
            Server::Http => ("http", Proto::TcpListen, HTTP_PORT),
            Server::Iperf3 => ("iperf3", Proto::TcpListen, IPERF3_PORT),
        };
        let port_s = port.to_string();
        let (udp_script, tcp_script) = (self.path("udp_echo.py"), self.path("tcp_echo.py"));
        let root = self.dir.join("www");
        let root_s = root.to_string_lossy().into_owned();
        let argv: Vec<&str> = match server {
            Server::UdpEcho => vec![py, &udp_script, &port_s],
            Server::TcpEcho => vec![py, &tcp_script, &port_s],
            Server::Http => {
                fs::create_dir_all(&root).unwrap();
                for (file, body) in &self.cfg.http_files {
                    fs::write(root.join(file), body).unwrap();
                }
                let dir = ["--bind", "::", "--directory", &root_s];
                [py, "-m", "http.server", &port_s]
                    .into_iter()
                    .chain(dir)
                    .collect()
            }
            Server::Iperf3 => vec!["iperf3", "-s", "-p", &port_s],
        };
        let id = self.spawn(&inet, name, &argv);
        self.wait_listening(id, proto, port);
    }

    /// Waits until process `id` has a socket on `port` (panics, showing its log, otherwise).
    #[track_caller]
    pub fn wait_listening(&mut self, id: ProcId, proto: Proto, port: u16) {
        let ok = wait_until(Duration::from_secs(10), || {
            let p = &mut self.procs[id.0];
            if !p.is_alive() {
                return Some(false);
            }
            bound_sockets(p.pid(), proto)
                .iter()
                .any(|a| a.port() == port)
                .then_some(true)
        });
        if ok != Some(true) {
            let p = &self.procs[id.0];
            panic!(
                "{} never listened on {proto:?} port {port}\n{}",
                p.name,
                p.log_tail(50)
            );
        }
    }
}
