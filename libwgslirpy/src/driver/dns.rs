//! The DNS edge: the host resolver pool and the sockets to upstream
//! nameservers, carrying out the core's DNS actions.
//!
//! - **Resolving** ([`SocketAction::DnsResolve`](crate::core::SocketAction)):
//!   getaddrinfo blocks, so each lookup runs on tokio's blocking pool, but
//!   only after taking one of `resolver_threads` semaphore permits (shared
//!   by every router shard, [`DnsShared`]), which it
//!   holds until getaddrinfo returns. Lookups beyond that wait for a permit
//!   in a small task; the core's cap on queries in flight bounds those tasks.
//!   A cancelled lookup that has not started never starts; one that has
//!   cannot be interrupted, keeps its permit until getaddrinfo returns, and
//!   its result is dropped.
//! - **Forwarding** ([`SocketAction::DnsForward`](crate::core::SocketAction)):
//!   the nameservers come from `/etc/resolv.conf`, read once at startup (at
//!   most three, as glibc reads). Each attempt uses a fresh socket on a
//!   random port, connected to one nameserver, and a random query ID; only
//!   a response with that ID from that nameserver is taken. Nameservers are
//!   tried in order, each for an equal share of the DNS timeout; one that
//!   refuses (ICMP unreachable), answers SERVFAIL or REFUSED, or stays
//!   silent passes the query to the next. The last SERVFAIL/REFUSED answer
//!   is relayed if no nameserver does better.
//! - Results travel to the router task as [`HostEvent::DnsResult`] over the
//!   driver's bounded event channel; the waiting happens in the per-query
//!   task, never in the router task.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::HostEvent;
use crate::Config;
use crate::core::{DnsOutcome, DnsQueryId};

/// Where the host's nameservers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// glibc's MAXNS: nameservers past the third are ignored.
const MAX_NAMESERVERS: usize = 3;
/// The shortest time one nameserver gets.
const MIN_ATTEMPT: Duration = Duration::from_millis(500);
const DNS_PORT: u16 = 53;
/// The largest DNS message over UDP.
const MAX_MESSAGE: usize = 65535;

/// What every router shard's [`DnsDriver`] shares: the resolver permits
/// and the nameservers, read once.
#[derive(Clone)]
pub(super) struct DnsShared {
    resolver: Arc<Semaphore>,
    nameservers: Arc<[SocketAddr]>,
}

impl DnsShared {
    /// The permits of `config.resolver_threads`, and the host's nameservers
    /// if `config` has a DNS server (logged).
    pub(super) fn new(config: &Config) -> Self {
        let nameservers: Vec<SocketAddr> = match config.dns {
            None => Vec::new(),
            Some(addr) => {
                let nameservers = match std::fs::read_to_string(RESOLV_CONF) {
                    Ok(text) => parse_resolv_conf(&text),
                    Err(error) => {
                        tracing::debug!(%error, "cannot read {RESOLV_CONF}");
                        Vec::new()
                    }
                };
                if nameservers.is_empty() {
                    tracing::warn!(
                        %addr,
                        "DNS server: {RESOLV_CONF} names no nameserver, so only A and AAAA \
                         queries are answered (others get NOTIMP)"
                    );
                } else {
                    tracing::info!(%addr, ?nameservers, "DNS server: forwarding to nameservers");
                }
                nameservers
            }
        };
        DnsShared {
            resolver: Arc::new(Semaphore::new(config.resolver_threads)),
            nameservers: nameservers.into(),
        }
    }
}

/// One router shard's DNS edge: the shared resolver pool and nameservers,
/// and the tasks working on its queries.
pub(super) struct DnsDriver {
    tasks: HashMap<DnsQueryId, JoinHandle<()>>,
    resolver: Arc<Semaphore>,
    nameservers: Arc<[SocketAddr]>,
    timeout: Duration,
    events: mpsc::Sender<HostEvent>,
}

impl DnsDriver {
    /// Works with `shared`, reporting results to `events`.
    pub(super) fn new(
        config: &Config,
        shared: &DnsShared,
        events: mpsc::Sender<HostEvent>,
    ) -> Self {
        DnsDriver {
            tasks: HashMap::new(),
            resolver: shared.resolver.clone(),
            nameservers: shared.nameservers.clone(),
            timeout: config.dns_timeout,
            events,
        }
    }

    /// Looks `name` up with getaddrinfo on the blocking pool.
    pub(super) fn resolve(&mut self, query: DnsQueryId, name: String) {
        let (resolver, events) = (self.resolver.clone(), self.events.clone());
        let task = tokio::spawn(async move {
            let outcome = match resolver.acquire_owned().await {
                Ok(permit) => tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    lookup(&name)
                })
                .await
                .unwrap_or(DnsOutcome::Failed),
                Err(_closed) => DnsOutcome::Failed,
            };
            let _ = events.send(HostEvent::DnsResult { query, outcome }).await;
        });
        self.tasks.insert(query, task);
    }

    /// Sends `message` to the nameservers, one after the other.
    pub(super) fn forward(&mut self, query: DnsQueryId, message: Bytes) {
        let (nameservers, events) = (self.nameservers.clone(), self.events.clone());
        let per_server = (self.timeout / nameservers.len().max(1) as u32).max(MIN_ATTEMPT);
        let task = tokio::spawn(async move {
            let outcome = ask_nameservers(&nameservers, &message, per_server).await;
            let _ = events.send(HostEvent::DnsResult { query, outcome }).await;
        });
        self.tasks.insert(query, task);
    }

    /// Gives up on `query`.
    pub(super) fn cancel(&mut self, query: DnsQueryId) {
        if let Some(task) = self.tasks.remove(&query) {
            task.abort();
        }
    }

    /// The result of `query` has arrived: forget its task.
    pub(super) fn finished(&mut self, query: DnsQueryId) {
        self.tasks.remove(&query);
    }
}

impl Drop for DnsDriver {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// getaddrinfo for both families. "No such name" and "no data" are told
/// apart by the error kind; every other failure is [`DnsOutcome::Failed`].
fn lookup(name: &str) -> DnsOutcome {
    let hints = dns_lookup::AddrInfoHints {
        socktype: dns_lookup::SockType::DGram.into(),
        ..Default::default()
    };
    match dns_lookup::getaddrinfo(Some(name), None, Some(hints)) {
        Ok(results) => DnsOutcome::Addresses(
            results
                .filter_map(Result::ok)
                .map(|info| info.sockaddr.ip())
                .collect(),
        ),
        Err(error) => match error.kind() {
            dns_lookup::LookupErrorKind::NoName => DnsOutcome::NoSuchName,
            dns_lookup::LookupErrorKind::NoData => DnsOutcome::Addresses(Vec::new()),
            kind => {
                tracing::trace!(name, ?kind, "host resolver failed");
                DnsOutcome::Failed
            }
        },
    }
}

/// Tries each nameserver in turn for `per_server`; see the module docs.
async fn ask_nameservers(
    nameservers: &[SocketAddr],
    message: &[u8],
    per_server: Duration,
) -> DnsOutcome {
    if nameservers.is_empty() {
        return DnsOutcome::NoNameserver;
    }
    if message.len() < 12 {
        return DnsOutcome::Failed;
    }
    let mut fallback = None;
    let mut buf = vec![0; MAX_MESSAGE];
    for &server in nameservers {
        let id: u16 = rand::random();
        let mut query = message.to_vec();
        query[..2].copy_from_slice(&id.to_be_bytes());
        let attempt = tokio::time::timeout(per_server, ask(server, &query, &mut buf)).await;
        let len = match attempt {
            Ok(Ok(len)) => len,
            Ok(Err(error)) => {
                tracing::trace!(%server, %error, "nameserver failed");
                continue;
            }
            Err(_elapsed) => {
                tracing::trace!(%server, "nameserver did not answer in time");
                continue;
            }
        };
        let answer = Bytes::copy_from_slice(&buf[..len]);
        // SERVFAIL (2) or REFUSED (5): another nameserver may do better.
        if matches!(answer[3] & 0x0f, 2 | 5) {
            fallback = Some(answer);
            continue;
        }
        return DnsOutcome::Upstream(answer);
    }
    fallback.map_or(DnsOutcome::Failed, DnsOutcome::Upstream)
}

/// Sends `query` to `server` from a fresh connected socket and waits for a
/// response carrying its ID. Returns the response's length in `buf`.
async fn ask(server: SocketAddr, query: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    let local: SocketAddr = if server.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    loop {
        let len = socket.recv(buf).await?;
        let is_response = len >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0;
        if is_response {
            return Ok(len);
        }
        tracing::trace!(%server, len, "ignored a datagram that is not the awaited response");
    }
}

/// The nameservers of a resolv.conf: `nameserver ADDRESS` lines, at most
/// [`MAX_NAMESERVERS`]. Addresses with a zone (`fe80::1%eth0`) are skipped.
fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let address: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(address, DNS_PORT))
        })
        .take(MAX_NAMESERVERS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\n; nameserver 1.1.1.1\nsearch example.test\n\
                    nameserver 198.18.2.2\n  nameserver\tfd00:2::2  # trailing\n\
                    nameserver fe80::1%eth0\nnameserver bogus\n\
                    nameserver 198.18.2.3\nnameserver 198.18.2.4\n";
        let expected: Vec<SocketAddr> = ["198.18.2.2:53", "[fd00:2::2]:53", "198.18.2.3:53"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(parse_resolv_conf(text), expected);
        assert!(parse_resolv_conf("").is_empty());
    }

    /// A fake nameserver on loopback: answers the first query it gets with
    /// `respond(query)`, from the address it was asked at.
    async fn fake_nameserver(
        respond: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0; 2048];
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.unwrap();
                if let Some(reply) = respond(&buf[..len]) {
                    socket.send_to(&reply, from).await.unwrap();
                }
            }
        });
        addr
    }

    fn reply_with_rcode(rcode: u8) -> impl Fn(&[u8]) -> Option<Vec<u8>> {
        move |query| {
            let mut reply = query.to_vec();
            reply[2] |= 0x80;
            reply[3] = 0x80 | rcode;
            Some(reply)
        }
    }

    #[tokio::test]
    async fn forwarding_skips_silent_and_failing_nameservers() {
        let query = [0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 1];
        let silent = fake_nameserver(|_| None).await;
        let failing = fake_nameserver(reply_with_rcode(2)).await;
        let good = fake_nameserver(reply_with_rcode(0)).await;
        let wait = Duration::from_millis(500);
        let outcome = ask_nameservers(&[silent, failing, good], &query, wait).await;
        let DnsOutcome::Upstream(answer) = outcome else {
            panic!("no answer: {outcome:?}");
        };
        // The answer carries the random ID it was sent with; the core restores it.
        assert_eq!(answer[3] & 0x0f, 0);
        assert_eq!(answer[4..], query[4..]);

        let outcome = ask_nameservers(&[failing], &query, wait).await;
        assert!(matches!(outcome, DnsOutcome::Upstream(a) if a[3] & 0x0f == 2));
        let outcome = ask_nameservers(&[silent], &query, wait).await;
        assert_eq!(outcome, DnsOutcome::Failed);
        assert_eq!(
            ask_nameservers(&[], &query, wait).await,
            DnsOutcome::NoNameserver
        );
    }
}
