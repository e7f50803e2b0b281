//! End-to-end tests of the DNS server at `-D`: `dig` in the peer namespace asks the gateway
//! through the WireGuard tunnel. A and AAAA come from the gateway namespace's own resolution
//! (its `/etc/hosts`, then its resolv.conf); other types are forwarded. The gateway's
//! resolv.conf names the internet namespace, where a real DNS server answers: Debian's
//! `dnsmasq` (package `dnsmasq-base`, see `scripts/install-deps.sh`), run in the foreground
//! with no upstream and no hosts file, authoritative for the zone `test.` from its command
//! line (see [`start_dnsmasq`]). Its query log shows which address each query came from.
//!
//! A nameserver that never answers can't be made from dnsmasq (it answers everything in its
//! local zone, and forwarding to a dead upstream would only move the silence elsewhere), so
//! the SERVFAIL-on-timeout test runs a minimal python UDP sink on port 53 instead
//! ([`UDP_SINK_PY`]): it logs each datagram's sender and sends nothing back.
//!
//! Each test builds its own rig (see `rig/mod.rs`); they need root (and the dnsmasq tests
//! `dnsmasq` on `PATH`) and skip loudly without it (fail under `CI=true`). All traffic stays
//! inside the rig's namespaces.

mod rig;

use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

use rig::*;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `--dns-timeout` given to the gateway in these tests.
const DNS_TIMEOUT_SECS: u64 = 2;

/// Names added to the gateway's hosts file: one with only an IPv4 address, one with only IPv6.
const V4_ONLY: &str = "v4only.test";
const V4_ONLY_ADDR: &str = "198.18.2.7";
const V6_ONLY: &str = "v6only.test";
const V6_ONLY_ADDR: &str = "fd00:2::7";

/// UDP size that dnsmasq advertises in its answers' OPT records (`--edns-packet-max`). The
/// gateway's own answers advertise at most what the client offered (`dig`: 1232), and
/// dnsmasq's default is also 1232, so seeing this value proves the answer is dnsmasq's own.
const DNSMASQ_EDNS: u16 = 3999;
/// TTL of dnsmasq's records (`--local-ttl`); the gateway's own answers say 60.
const DNSMASQ_TTL: u32 = 300;

/// A nameserver that never answers: dual-stack UDP port 53, logs `<client ip> <length>` per
/// datagram and sends nothing.
const UDP_SINK_PY: &str = r#"
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 53))
while True:
    data, addr = s.recvfrom(65535)
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    print(host, len(data), flush=True)
"#;

/// What `dig` said.
#[derive(Debug)]
struct Dig {
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, …; empty if there was no answer.
    status: String,
    /// The header flags (`qr rd ra`, …).
    flags: Vec<String>,
    /// The answer section's RDATA fields, in order.
    answers: Vec<String>,
    /// The UDP size of the answer's OPT record, if it had one.
    edns_udp: Option<u16>,
    output: CmdOutput,
}

/// `dig @server -p port name qtype [extra]` from the peer namespace, one try of 4 s.
fn dig(rig: &Rig, server: SocketAddr, name: &str, qtype: &str, extra: &[&str]) -> Dig {
    let (at, port) = (format!("@{}", server.ip()), server.port().to_string());
    let mut argv = vec![
        "dig",
        &at,
        "-p",
        &port,
        "+tries=1",
        "+timeout=4",
        name,
        qtype,
    ];
    argv.extend_from_slice(extra);
    let output = rig.peer.run_timeout(&argv, Duration::from_secs(10));
    let text = &output.stdout;
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("")
        .to_owned();
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|rest| rest.split(';').next())
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let answers = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect();
    let edns_udp = text
        .lines()
        .find_map(|l| l.strip_prefix("; EDNS: "))
        .and_then(|l| l.split("udp: ").nth(1))
        .and_then(|n| n.trim().parse().ok());
    Dig {
        status,
        flags,
        answers,
        edns_udp,
        output,
    }
}

/// Checks status and answers of `dig name qtype`, and that recursion is offered.
#[track_caller]
fn assert_dig(
    rig: &Rig,
    server: SocketAddr,
    name: &str,
    qtype: &str,
    status: &str,
    answers: &[&str],
) -> Dig {
    let d = dig(rig, server, name, qtype, &[]);
    assert_eq!(d.status, status, "dig {name} {qtype}: {}", d.output);
    assert_eq!(d.answers, answers, "dig {name} {qtype}: {}", d.output);
    for flag in ["qr", "rd", "ra"] {
        assert!(
            d.flags.iter().any(|f| f == flag),
            "dig {name} {qtype}: flag {flag} missing: {}",
            d.output
        );
    }
    d
}

/// Adds the v4-only and v6-only names to the gateway's hosts file. `ip netns exec` bind-mounts
/// the file itself, and rewriting it in place keeps its inode, so a running gateway sees it.
fn extend_gateway_hosts(rig: &Rig) {
    let path = format!("/etc/netns/{}/hosts", rig.gw.name);
    let mut hosts = fs::read_to_string(&path).expect("the rig writes a hosts file");
    hosts.push_str(&format!(
        "{V4_ONLY_ADDR} {V4_ONLY}\n{V6_ONLY_ADDR} {V6_ONLY}\n"
    ));
    rig.gw.write_etc("hosts", &hosts);
}

/// Starts dnsmasq in the internet namespace as the authoritative server of the zone `test.`
/// and waits until it listens on UDP and TCP port 53 of [`INET_V4`] and [`INET_V6`]. Zone:
/// - `mail.test`: MX `10 mx.mail.test.` and TXT `"hello from the test zone"`;
/// - `dnsonly.test`: A 198.18.2.50 and AAAA fd00:2::50 (a name the gateway's hosts file lacks);
/// - `txtonly.test`: TXT only (NOERROR with no answers for other types);
/// - any other name under `test.`: NXDOMAIN.
///
/// `--no-daemon` keeps it in the foreground as the spawned process itself (so the rig stops it
/// by PID), writes no PID file, keeps the user it was started as and serves TCP in that one
/// process rather than in forked children. `--conf-file=/dev/null`, `--no-resolv` and
/// `--no-hosts` keep the host's configuration, upstreams and `/etc/hosts` out; `--local`
/// answers the zone without forwarding; `--log-facility=-` sends the query log to the log
/// file. Returns its process.
fn start_dnsmasq(rig: &mut Rig) -> ProcId {
    let inet = rig.inet.clone();
    let edns = format!("--edns-packet-max={DNSMASQ_EDNS}");
    let ttl = format!("--local-ttl={DNSMASQ_TTL}");
    let listen_v4 = format!("--listen-address={INET_V4}");
    let listen_v6 = format!("--listen-address={INET_V6}");
    let id = rig.spawn(
        &inet,
        "dnsmasq",
        &[
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            &listen_v4,
            &listen_v6,
            "--port=53",
            "--local=/test/",
            "--mx-host=mail.test,mx.mail.test,10",
            "--txt-record=mail.test,hello from the test zone",
            "--txt-record=txtonly.test,only text",
            "--host-record=dnsonly.test,198.18.2.50,fd00:2::50",
            &ttl,
            &edns,
            "--log-queries",
            "--log-facility=-",
        ],
    );
    rig.wait_listening(id, Proto::Udp, 53);
    rig.wait_listening(id, Proto::TcpListen, 53);
    id
}

/// The `(type, name, client address)` of each `query[TYPE] name from address` line of a
/// dnsmasq log (`--log-queries`).
fn logged_queries(log: &str) -> Vec<(&str, &str, &str)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("query[").nth(1)?;
            let (qtype, rest) = rest.split_once("] ")?;
            let (name, from) = rest.split_once(" from ")?;
            Some((qtype, name, from.trim()))
        })
        .collect()
}

/// Starts [`UDP_SINK_PY`] in the internet namespace; returns its process.
fn start_udp_sink(rig: &mut Rig) -> ProcId {
    let script = rig.dir.join("udp_sink.py");
    fs::write(&script, UDP_SINK_PY).unwrap();
    let inet = rig.inet.clone();
    let script = script.to_string_lossy().into_owned();
    let id = rig.spawn(&inet, "udp-sink", &["python3", &script]);
    rig.wait_listening(id, Proto::Udp, 53);
    id
}

fn dns_v4() -> SocketAddr {
    SocketAddr::new(PINGABLE_V4.into(), 53)
}

fn dns_args(server: SocketAddr) -> Vec<String> {
    vec![
        "-D".into(),
        server.to_string(),
        "--dns-timeout".into(),
        DNS_TIMEOUT_SECS.to_string(),
    ]
}

fn builder(test: &str, server: SocketAddr) -> RigBuilder {
    let args = dns_args(server);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Rig::builder(test).gateway_args(&args)
}

/// A and AAAA from the gateway's hosts file and its nameserver, with exactly the type asked;
/// NXDOMAIN and NOERROR-without-answers; MX and TXT forwarded and relayed unchanged.
#[test]
fn dns_answers_from_hosts_file_and_forwards_other_types() {
    let Some(mut rig) = builder(
        "dns_answers_from_hosts_file_and_forwards_other_types",
        dns_v4(),
    )
    .needs_tool("dnsmasq")
    .start() else {
        return;
    };
    let ns = start_dnsmasq(&mut rig);
    extend_gateway_hosts(&rig);
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let server = dns_v4();

    // The hosts file, both families, each answer of exactly the asked type.
    let inet_v4 = INET_V4.to_string();
    let inet_v6 = INET_V6.to_string();
    let d = assert_dig(
        &rig,
        server,
        INET_HOSTNAME,
        "A",
        "NOERROR",
        &[&format!("IN A {inet_v4}")],
    );
    assert!(d.output.stdout.contains("IN\tA\t"), "{}", d.output);
    assert!(
        d.output.stdout.contains("\t60\tIN\tA"),
        "TTL not 60: {}",
        d.output
    );
    assert_dig(
        &rig,
        server,
        INET_HOSTNAME,
        "AAAA",
        "NOERROR",
        &[&format!("IN AAAA {inet_v6}")],
    );
    assert_dig(
        &rig,
        server,
        V4_ONLY,
        "A",
        "NOERROR",
        &[&format!("IN A {V4_ONLY_ADDR}")],
    );
    assert_dig(
        &rig,
        server,
        V6_ONLY,
        "AAAA",
        "NOERROR",
        &[&format!("IN AAAA {V6_ONLY_ADDR}")],
    );
    // Names that exist without an address of the asked family.
    assert_dig(&rig, server, V4_ONLY, "AAAA", "NOERROR", &[]);
    assert_dig(&rig, server, V6_ONLY, "A", "NOERROR", &[]);
    // Through the gateway's own resolver to dnsmasq.
    assert_dig(
        &rig,
        server,
        "dnsonly.test",
        "A",
        "NOERROR",
        &["IN A 198.18.2.50"],
    );
    assert_dig(
        &rig,
        server,
        "dnsonly.test",
        "AAAA",
        "NOERROR",
        &["IN AAAA fd00:2::50"],
    );
    assert_dig(&rig, server, "missing.test", "A", "NXDOMAIN", &[]);
    assert_dig(&rig, server, "missing.test", "AAAA", "NXDOMAIN", &[]);
    assert_dig(&rig, server, "txtonly.test", "A", "NOERROR", &[]);

    // Other types: forwarded, relayed unchanged: dnsmasq's own EDNS size and TTL.
    let mx = assert_dig(
        &rig,
        server,
        "mail.test",
        "MX",
        "NOERROR",
        &["IN MX 10 mx.mail.test."],
    );
    assert_eq!(
        mx.edns_udp,
        Some(DNSMASQ_EDNS),
        "EDNS not relayed: {}",
        mx.output
    );
    assert!(
        mx.output
            .stdout
            .contains(&format!("\t{DNSMASQ_TTL}\tIN\tMX")),
        "TTL changed: {}",
        mx.output
    );
    // dnsmasq is authoritative for `test.`; the gateway's own answers never say so.
    assert!(
        mx.flags.iter().any(|f| f == "aa"),
        "AA flag not relayed: {}",
        mx.output
    );
    let txt = assert_dig(
        &rig,
        server,
        "mail.test",
        "TXT",
        "NOERROR",
        &["IN TXT \"hello from the test zone\""],
    );
    assert_eq!(txt.edns_udp, Some(DNSMASQ_EDNS), "{}", txt.output);
    assert_dig(
        &rig,
        server,
        "txtonly.test",
        "TXT",
        "NOERROR",
        &["IN TXT \"only text\""],
    );
    assert_dig(&rig, server, "missing.test", "MX", "NXDOMAIN", &[]);
    // Without EDNS the answer carries none.
    let plain = dig(&rig, server, "mail.test", "MX", &["+noedns"]);
    assert_eq!(plain.edns_udp, None, "{}", plain.output);

    // dnsmasq saw the forwarded queries, and the gateway resolver's, all from the gateway's
    // internet-side address, never from a tunnel address.
    let log = rig.proc(ns).log();
    let queries = logged_queries(&log);
    let gw = GW_INET_V4.to_string();
    for (qtype, name) in [
        ("MX", "mail.test"),
        ("TXT", "mail.test"),
        ("A", "dnsonly.test"),
    ] {
        assert!(
            queries.iter().any(|q| q == &(qtype, name, gw.as_str())),
            "no {qtype} {name} from {gw} in the dnsmasq log:\n{log}"
        );
    }
    assert!(
        queries.iter().all(|&(_, _, from)| from == gw),
        "a query from elsewhere than {gw}:\n{log}"
    );
    assert!(
        !log.contains(&PEER_INNER_V4.to_string()),
        "a tunnel address leaked: {log}"
    );
    assert!(rig.gateway_alive());
}

/// A nameserver that never answers: SERVFAIL once the DNS timeout has passed, not silence.
/// Malformed queries get FORMERR, a datagram without a header nothing, and the server goes on.
/// The gateway runs as `nobody`: resolving and forwarding need no privilege.
#[test]
fn dns_servfail_on_silent_upstream_and_formerr_on_garbage() {
    let Some(mut rig) = builder(
        "dns_servfail_on_silent_upstream_and_formerr_on_garbage",
        dns_v4(),
    )
    .unprivileged()
    .start() else {
        return;
    };
    let sink = start_udp_sink(&mut rig);
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let server = dns_v4();

    let d = assert_dig(&rig, server, "silent.test", "MX", "SERVFAIL", &[]);
    let timeout = Duration::from_secs(DNS_TIMEOUT_SECS);
    assert!(
        d.output.elapsed >= timeout - Duration::from_millis(500)
            && d.output.elapsed < timeout + Duration::from_secs(2),
        "SERVFAIL after {:?}, wanted about {timeout:?}",
        d.output.elapsed
    );
    // The query did reach the sink, from the gateway's internet-side address.
    let log = rig.proc(sink).log();
    assert!(
        log.lines()
            .any(|l| l.split_whitespace().next() == Some(&GW_INET_V4.to_string())),
        "sink log: {log}"
    );

    // A header asking one question, then a name running off the end.
    let garbage = [
        0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0x3f, b'x', b'y',
    ];
    let reply = rig
        .udp_roundtrip(&rig.peer, server, &garbage, 2, Duration::from_secs(2))
        .unwrap_or_else(|out| panic!("no answer to a malformed query:\n{out}"));
    assert_eq!(reply.from, server);
    assert_eq!(reply.payload.len(), 12, "{:02x?}", reply.payload);
    assert_eq!(reply.payload[..2], [0xab, 0xcd], "ID not kept");
    assert_eq!(
        reply.payload[3] & 0x0f,
        1,
        "not FORMERR: {:02x?}",
        reply.payload
    );
    // Too short for a header: dropped.
    let none = rig.udp_roundtrip(&rig.peer, server, &[1, 2, 3], 1, Duration::from_secs(1));
    assert!(none.is_err(), "answered a headerless datagram: {none:?}");

    assert_dig(
        &rig,
        server,
        INET_HOSTNAME,
        "A",
        "NOERROR",
        &[&format!("IN A {INET_V4}")],
    );
    assert!(rig.gateway_alive());
}

/// The gateway's resolv.conf names no nameserver: forwarded types are NOTIMP, while A and AAAA
/// still come from the hosts file. Served on the IPv6 inner address.
#[test]
fn dns_notimp_without_nameserver_over_ipv6() {
    let server = SocketAddr::new(PINGABLE_V6.into(), 53);
    let Some(mut rig) = builder("dns_notimp_without_nameserver_over_ipv6", server)
        .defer_gateway()
        .start()
    else {
        return;
    };
    rig.gw.write_etc("resolv.conf", "# no nameserver\n");
    rig.start_gateway();
    // The peer's first handshake went out before the gateway ran; WireGuard retries after 5 s.
    rig.wait_handshake(HANDSHAKE_TIMEOUT * 2);
    assert_dig(&rig, server, "mail.test", "MX", "NOTIMP", &[]);
    assert_dig(
        &rig,
        server,
        INET_HOSTNAME,
        "AAAA",
        "NOERROR",
        &[&format!("IN AAAA {INET_V6}")],
    );
    let log = rig.gateway_log();
    assert!(
        log.contains("names no nameserver"),
        "no startup warning: {log}"
    );
}

/// DNS over TCP on the same address: `dig +tcp` gets answers from the hosts file and
/// forwarded ones, and a `+tcp` query keeps working after the UDP ones.
#[test]
fn dns_over_tcp_answers_local_and_forwarded_queries() {
    let Some(mut rig) = builder("dns_over_tcp", dns_v4())
        .needs_tool("dnsmasq")
        .start()
    else {
        return;
    };
    start_dnsmasq(&mut rig);
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let server = dns_v4();
    for _ in 0..2 {
        let d = dig(&rig, server, INET_HOSTNAME, "A", &["+tcp"]);
        assert_eq!(d.status, "NOERROR", "{}", d.output);
        assert_eq!(d.answers, [format!("IN A {INET_V4}")], "{}", d.output);
        assert!(
            d.output.stdout.contains("(TCP)"),
            "not over TCP: {}",
            d.output
        );
    }
    let d = dig(&rig, server, INET_HOSTNAME, "AAAA", &["+tcp"]);
    assert_eq!(d.answers, [format!("IN AAAA {INET_V6}")], "{}", d.output);
    let d = dig(&rig, server, "nonexistent.test", "A", &["+tcp"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
    let d = dig(&rig, server, "mail.test", "MX", &["+tcp"]);
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert_eq!(d.answers, ["IN MX 10 mx.mail.test."], "{}", d.output);
}
