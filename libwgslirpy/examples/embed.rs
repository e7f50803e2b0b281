//! Embedding [`libwgslirpy::core::Router`] with an I/O layer of your own.
//!
//! No tunnel here and no tokio: this program plays the peer itself, hands the
//! router three IP packets (a ping to the pingable address, a DNS query for
//! `localhost`, and a UDP datagram to a host service), carries out the socket
//! actions the router asks for with plain `std` sockets, and prints what the
//! router sends back toward the peer. Everything stays on the loopback: the
//! UDP service is an echo server on 127.0.0.1, reached through
//! `--host-address` (10.0.2.2 inside the tunnel is the host's loopback).
//!
//! Run it with `cargo run -p libwgslirpy --example embed`.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use libwgslirpy::Config;
use libwgslirpy::config::Transport;
use libwgslirpy::core::packet::{self, Parsed};
use libwgslirpy::core::{DnsOutcome, FlowId, Router, SocketAction};

/// The peer's address inside the tunnel.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The router's own address: pingable, and the DNS server.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// Inside the tunnel, the host's loopback.
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

fn main() -> std::io::Result<()> {
    for line in run()? {
        println!("{line}");
    }
    Ok(())
}

/// Runs the whole exchange and returns one line per packet the router sent
/// toward the peer.
pub fn run() -> std::io::Result<Vec<String>> {
    // A UDP echo server on the loopback, answering one datagram.
    let echo = UdpSocket::bind("127.0.0.1:0")?;
    let echo_port = echo.local_addr()?.port();
    let server = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 1500];
        let (n, from) = echo.recv_from(&mut buf)?;
        echo.send_to(&buf[..n], from)?;
        Ok(())
    });

    // One peer (raw IP mode needs no keys); the router owns no socket.
    let mut config = Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        "127.0.0.1:0".parse().expect("literal"),
    );
    config.pingable = vec![GATEWAY.into()];
    config.dns = Some(SocketAddr::new(GATEWAY.into(), 53));
    config.host_address = Some(HOST.into());
    let mut router = Router::new(&config);
    let mut io = Io::default();
    let mut lines = Vec::new();

    // 1. A ping to the pingable address: answered by the router itself.
    router.handle_packet(Instant::now(), &echo_request(PEER, GATEWAY, b"ping"));
    io.drain(&mut router, &mut lines)?;

    // 2. A DNS query: the router asks us to resolve the name.
    let query = dns_query("localhost");
    let dns = packet::build_udp(
        SocketAddr::new(PEER.into(), 5353),
        SocketAddr::new(GATEWAY.into(), 53),
        &query,
    )
    .expect("a small datagram");
    router.handle_packet(Instant::now(), &dns);
    io.drain(&mut router, &mut lines)?;

    // 3. A UDP datagram to the host's echo server: the router asks us to
    //    open a socket and send; the reply goes back to the peer.
    let datagram = packet::build_udp(
        SocketAddr::new(PEER.into(), 40000),
        SocketAddr::new(HOST.into(), echo_port),
        b"hello through the router",
    )
    .expect("a small datagram");
    router.handle_packet(Instant::now(), &datagram);
    io.drain(&mut router, &mut lines)?;
    io.receive(&mut router, &mut lines)?;

    server
        .join()
        .map_err(|_| std::io::Error::other("echo server panicked"))??;
    Ok(lines)
}

/// The embedder's side of the router: its host sockets, keyed by flow.
#[derive(Default)]
struct Io {
    udp: Vec<(FlowId, UdpSocket)>,
}

impl Io {
    /// Carries out every socket action, then takes every packet for the
    /// peer, in the order the router's documentation asks for.
    fn drain(&mut self, router: &mut Router, lines: &mut Vec<String>) -> std::io::Result<()> {
        while let Some(action) = router.poll_socket_action() {
            match action {
                SocketAction::UdpOpen { flow, ipv6 } => {
                    let bind = if ipv6 { "[::]:0" } else { "0.0.0.0:0" };
                    let socket = UdpSocket::bind(bind)?;
                    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
                    self.udp.push((flow, socket));
                }
                SocketAction::UdpSend {
                    flow,
                    dest,
                    payload,
                } => {
                    if let Some((_, socket)) = self.udp.iter().find(|(f, _)| *f == flow) {
                        socket.send_to(&payload, dest)?;
                    }
                }
                SocketAction::UdpClose { flow } => self.udp.retain(|(f, _)| *f != flow),
                SocketAction::DnsResolve { query, name } => {
                    // Only `localhost` is looked up, so that the example never
                    // leaves the machine.
                    let outcome = if name == "localhost" {
                        let addresses = ("localhost", 0)
                            .to_socket_addrs()
                            .map(|a| a.map(|a| a.ip()).collect())
                            .unwrap_or_default();
                        DnsOutcome::Addresses(addresses)
                    } else {
                        DnsOutcome::NoSuchName
                    };
                    router.handle_dns_result(Instant::now(), query, outcome);
                }
                // A real embedder carries out the TCP, ICMP, forward and
                // DNS-forwarding actions too; this exchange needs none.
                other => lines.push(format!("(not carried out: {other:?})")),
            }
        }
        while let Some(out) = router.poll_transmit() {
            lines.push(describe(&out));
        }
        Ok(())
    }

    /// Waits for the datagram on each UDP socket and hands it to the router.
    fn receive(&mut self, router: &mut Router, lines: &mut Vec<String>) -> std::io::Result<()> {
        let mut buf = [0u8; 1500];
        for i in 0..self.udp.len() {
            let (flow, ref socket) = self.udp[i];
            let (n, from) = socket.recv_from(&mut buf)?;
            router.handle_udp_datagram(Instant::now(), flow, from, &buf[..n]);
        }
        self.drain(router, lines)
    }
}

/// One line about a packet for the peer.
fn describe(packet: &[u8]) -> String {
    // `parse` reads what peers send; an echo reply is read by hand.
    if packet.len() >= 28 && packet[0] >> 4 == 4 && packet[9] == 1 && packet[20] == 0 {
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let data = String::from_utf8_lossy(&packet[28..]);
        return format!("ICMP echo reply {src} -> {dst}: {data:?}");
    }
    match packet::parse(packet) {
        Ok(Parsed::Udp { src, dst, payload }) if src.port() == 53 => {
            let answers = u16::from_be_bytes([payload[6], payload[7]]);
            let rcode = payload[3] & 0x0f;
            format!("DNS answer {src} -> {dst}: rcode {rcode}, {answers} answer(s)")
        }
        Ok(Parsed::Udp { src, dst, payload }) => {
            format!("UDP {src} -> {dst}: {:?}", String::from_utf8_lossy(payload))
        }
        _ => format!("another packet, {} bytes", packet.len()),
    }
}

/// An IPv4 ICMP echo request, checksums included.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let total = 28 + data.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 1; // ICMP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20] = 8; // echo request
    p[24..26].copy_from_slice(&0x1234u16.to_be_bytes()); // identifier
    p[26..28].copy_from_slice(&1u16.to_be_bytes()); // sequence number
    p[28..].copy_from_slice(data);
    let sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A DNS query for the A record of `name`.
fn dns_query(name: &str) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}
