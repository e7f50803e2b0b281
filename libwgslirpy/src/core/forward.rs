//! Reverse forwarding (`-u` and `-t HOST,SOURCE,DEST`): host ports into the
//! tunnel.
//!
//! Theory of operation, UDP ([`ReverseUdp`]):
//! - The driver listens on each forward's HOST socket and hands every
//!   datagram to the router with the forward's index and the host-side
//!   sender's address.
//! - Each (forward, host-side sender) pair is a session. The session sends
//!   to DEST inside the tunnel from a tunnel-side source address of its own:
//!   SOURCE if given, else the sender's own address, so the service inside
//!   the tunnel sees who is talking. When that address is already taken by
//!   another session, or SOURCE's port is 0, the session takes the next free
//!   port of the same address, round-robin over the ephemeral range.
//! - A datagram from the peer whose source is a session's DEST and whose
//!   destination is that session's tunnel-side source is a reply: it goes
//!   back out of the HOST socket to that session's sender, and to no one
//!   else. Replies are matched before outbound NAT.
//! - Sessions belong to the peer that owns DEST (the longest allowed-IPs
//!   prefix containing it) and are bounded per peer ([`FlowTable`]): a peer
//!   at the limit loses its least recently used session, and a session idle
//!   in both directions for the idle timeout is closed. A DEST that no peer
//!   owns gets nothing.
//! - A sender of the other IP version than DEST is dropped and counted
//!   (without SOURCE there is no address of DEST's version to send from).
//!
//! TCP ([`ReverseTcp`]): the driver accepts on each `-t` HOST socket and
//! hands the accepted socket to the router, which picks the connection's
//! tunnel-side source here, by the same rules as UDP (SOURCE or the
//! client's own address; the next free port, round-robin, when it is taken
//! or SOURCE's port is 0), "taken" meaning that a TCP connection already
//! uses that (source, DEST) pair. The connection itself is an active open
//! in [`super::tcp`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use super::flows::{FlowId, FlowTable};
use super::peers::PeerId;
use crate::config::Forward;

/// Ports that sessions take when their preferred source port is busy.
const EPHEMERAL_PORTS: RangeInclusive<u16> = 49152..=65535;

/// One session: where it sends from, inside the tunnel.
#[derive(Clone, Copy, Debug)]
struct Session {
    tunnel_source: SocketAddr,
}

/// A session's key: the forward's index, and the host-side sender.
type SessionKey = (usize, SocketAddr);

/// What to do with a datagram from a host-side sender.
#[derive(Debug, PartialEq, Eq)]
pub struct Outbound {
    /// The tunnel-side source to send from.
    pub source: SocketAddr,
    /// The destination inside the tunnel.
    pub dest: SocketAddr,
}

/// Where a reply from the tunnel goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// The forward whose HOST socket sends it.
    pub forward: usize,
    /// The host-side sender to send it to.
    pub to: SocketAddr,
}

/// Round-robin choice of tunnel-side source ports.
struct SourcePorts {
    next_port: u16,
}

impl SourcePorts {
    fn new() -> Self {
        SourcePorts {
            next_port: *EPHEMERAL_PORTS.start(),
        }
    }

    /// `preferred` if its port is not 0 and it is not `in_use`; else the
    /// next port of its address that is not in use, round-robin over the
    /// ephemeral range. `None` if every one is.
    fn pick(
        &mut self,
        preferred: SocketAddr,
        in_use: impl Fn(SocketAddr) -> bool,
    ) -> Option<SocketAddr> {
        if preferred.port() != 0 && !in_use(preferred) {
            return Some(preferred);
        }
        let span = usize::from(EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start()) + 1;
        for _ in 0..span {
            let candidate = SocketAddr::new(preferred.ip(), self.next_port);
            self.next_port = if self.next_port == *EPHEMERAL_PORTS.end() {
                *EPHEMERAL_PORTS.start()
            } else {
                self.next_port + 1
            };
            if !in_use(candidate) {
                return Some(candidate);
            }
        }
        None
    }
}

/// The reverse UDP forwards and their sessions.
pub struct ReverseUdp {
    forwards: Vec<Forward>,
    sessions: FlowTable<SessionKey, Session>,
    by_tunnel_source: HashMap<SocketAddr, FlowId>,
    ports: SourcePorts,
}

impl ReverseUdp {
    /// The `-u` forwards, with at most `max_sessions` sessions that close
    /// after `idle_timeout`.
    pub fn new(forwards: Vec<Forward>, max_sessions: usize, idle_timeout: Duration) -> Self {
        ReverseUdp {
            forwards,
            sessions: FlowTable::new(max_sessions, idle_timeout),
            by_tunnel_source: HashMap::new(),
            ports: SourcePorts::new(),
        }
    }

    /// A datagram from `sender` arrived on the HOST socket of `forward`.
    /// Returns where to send it in the tunnel, or `None` if it cannot go.
    /// `owner_of` names the peer that owns an address inside the tunnel.
    pub fn from_host(
        &mut self,
        now: Instant,
        forward: usize,
        sender: SocketAddr,
        owner_of: impl Fn(std::net::IpAddr) -> Option<PeerId>,
    ) -> Option<Outbound> {
        let sender = SocketAddr::new(sender.ip().to_canonical(), sender.port());
        let dest = self.forwards.get(forward)?.dest;
        if let Some(flow) = self.sessions.lookup(&(forward, sender)) {
            self.sessions.touch(flow, now);
            let (_, session) = self.sessions.get(flow)?;
            return Some(Outbound {
                source: session.tunnel_source,
                dest,
            });
        }
        let preferred = self.forwards[forward].source.unwrap_or(sender);
        if preferred.is_ipv6() != dest.is_ipv6() {
            return None;
        }
        let owner = owner_of(dest.ip())?;
        let tunnel_source = self.free_source(preferred)?;
        let (flow, evicted) =
            self.sessions
                .insert(owner, (forward, sender), Session { tunnel_source }, now);
        if let Some((_, _, old)) = evicted {
            self.by_tunnel_source.remove(&old.tunnel_source);
        }
        self.by_tunnel_source.insert(tunnel_source, flow);
        tracing::debug!(forward, %sender, %tunnel_source, %dest, "new reverse UDP session");
        Some(Outbound {
            source: tunnel_source,
            dest,
        })
    }

    /// A datagram from the peer, from `src` to `dst`: if it answers a
    /// session, where it goes.
    pub fn from_tunnel(&mut self, now: Instant, src: SocketAddr, dst: SocketAddr) -> Option<Reply> {
        let flow = *self.by_tunnel_source.get(&dst)?;
        let (&(forward, sender), _) = self.sessions.get(flow)?;
        if self.forwards[forward].dest != src {
            return None;
        }
        self.sessions.touch(flow, now);
        Some(Reply {
            forward,
            to: sender,
        })
    }

    /// Closes every session of `owner`.
    pub fn close_owner(&mut self, owner: PeerId) -> usize {
        let by_tunnel_source = &mut self.by_tunnel_source;
        self.sessions.remove_owner(owner, |_, _, session| {
            by_tunnel_source.remove(&session.tunnel_source);
        })
    }

    /// Closes idle sessions.
    pub fn expire(&mut self, now: Instant) {
        let by_tunnel_source = &mut self.by_tunnel_source;
        self.sessions.expire(now, |_, _, session| {
            by_tunnel_source.remove(&session.tunnel_source);
        });
    }

    /// When the next session times out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.sessions.next_expiry()
    }

    /// `preferred` if no session uses it and its port is not 0; else the
    /// next free port of its address, round-robin.
    fn free_source(&mut self, preferred: SocketAddr) -> Option<SocketAddr> {
        let taken = &self.by_tunnel_source;
        self.ports.pick(preferred, |a| taken.contains_key(&a))
    }
}

/// The reverse TCP forwards: where their connections go, and from where.
pub struct ReverseTcp {
    forwards: Vec<Forward>,
    ports: SourcePorts,
}

impl ReverseTcp {
    /// The `-t` forwards.
    pub fn new(forwards: Vec<Forward>) -> Self {
        ReverseTcp {
            forwards,
            ports: SourcePorts::new(),
        }
    }

    /// The tunnel-side source and the DEST of a connection from `client`,
    /// accepted on the HOST socket of `forward`. `in_use(source, dest)`
    /// says whether a connection already has that pair. `None` if there is
    /// no such forward, no source of DEST's IP version, or no free port.
    pub fn endpoints(
        &mut self,
        forward: usize,
        client: SocketAddr,
        in_use: impl Fn(SocketAddr, SocketAddr) -> bool,
    ) -> Option<Outbound> {
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let Forward { source, dest, .. } = *self.forwards.get(forward)?;
        let preferred = source.unwrap_or(client);
        if preferred.is_ipv6() != dest.is_ipv6() {
            return None;
        }
        let source = self.ports.pick(preferred, |s| in_use(s, dest))?;
        Some(Outbound { source, dest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn forward(text: &str) -> Forward {
        text.parse().unwrap()
    }

    fn any(_: std::net::IpAddr) -> Option<PeerId> {
        Some(PeerId(0))
    }

    #[test]
    fn without_source_the_senders_address_is_used() {
        let mut reverse = ReverseUdp::new(
            vec![forward("0.0.0.0:5353,,10.0.2.15:53")],
            16,
            Duration::from_secs(60),
        );
        let now = Instant::now();
        let out = reverse
            .from_host(now, 0, sa("192.0.2.7:4000"), any)
            .unwrap();
        assert_eq!(out.source, sa("192.0.2.7:4000"));
        assert_eq!(out.dest, sa("10.0.2.15:53"));
        assert_eq!(
            reverse.from_tunnel(now, sa("10.0.2.15:53"), sa("192.0.2.7:4000")),
            Some(Reply {
                forward: 0,
                to: sa("192.0.2.7:4000")
            })
        );
        // Not from DEST: not a reply.
        assert_eq!(
            reverse.from_tunnel(now, sa("10.0.2.16:53"), sa("192.0.2.7:4000")),
            None
        );
    }

    #[test]
    fn senders_sharing_a_source_override_get_their_own_ports_and_replies() {
        let mut reverse = ReverseUdp::new(
            vec![forward("0.0.0.0:5353,10.0.2.1:53,10.0.2.15:53")],
            16,
            Duration::from_secs(60),
        );
        let now = Instant::now();
        let senders: Vec<SocketAddr> = (0..10).map(|i| sa(&format!("192.0.2.{i}:4000"))).collect();
        let sources: Vec<SocketAddr> = senders
            .iter()
            .map(|&s| reverse.from_host(now, 0, s, any).unwrap().source)
            .collect();
        assert_eq!(sources[0], sa("10.0.2.1:53"));
        let mut unique = sources.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 10, "{sources:?}");
        for (sender, source) in senders.iter().zip(&sources) {
            let reply = reverse
                .from_tunnel(now, sa("10.0.2.15:53"), *source)
                .unwrap();
            assert_eq!(reply.to, *sender);
        }
    }

    #[test]
    fn source_port_zero_goes_round_robin() {
        let mut reverse = ReverseUdp::new(
            vec![forward("[::]:5353,[fd00::1]:0,[fd00::15]:53")],
            16,
            Duration::from_secs(60),
        );
        let now = Instant::now();
        let a = reverse
            .from_host(now, 0, sa("[2001:db8::1]:1"), any)
            .unwrap()
            .source;
        let b = reverse
            .from_host(now, 0, sa("[2001:db8::1]:2"), any)
            .unwrap()
            .source;
        assert_eq!(a, sa("[fd00::1]:49152"));
        assert_eq!(b, sa("[fd00::1]:49153"));
    }

    #[test]
    fn sessions_expire_and_free_their_source() {
        let idle = Duration::from_secs(60);
        let mut reverse = ReverseUdp::new(
            vec![forward("0.0.0.0:1,10.0.2.1:53,10.0.2.15:53")],
            16,
            idle,
        );
        let t0 = Instant::now();
        reverse.from_host(t0, 0, sa("192.0.2.1:1"), any).unwrap();
        reverse.expire(t0 + idle);
        assert_eq!(
            reverse.from_tunnel(t0 + idle, sa("10.0.2.15:53"), sa("10.0.2.1:53")),
            None
        );
        let again = reverse
            .from_host(t0 + idle, 0, sa("192.0.2.2:1"), any)
            .unwrap();
        assert_eq!(again.source, sa("10.0.2.1:53"));
    }

    #[test]
    fn sender_of_the_other_ip_version_is_refused() {
        let mut reverse = ReverseUdp::new(
            vec![forward("[::]:5353,,[fd00::15]:53")],
            16,
            Duration::from_secs(60),
        );
        assert_eq!(
            reverse.from_host(Instant::now(), 0, sa("[::ffff:192.0.2.1]:1"), any),
            None
        );
        assert_eq!(
            reverse.from_host(Instant::now(), 7, sa("[fd00::9]:1"), any),
            None
        );
    }
}
