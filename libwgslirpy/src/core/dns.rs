//! The DNS server at the `-D` address inside the tunnel.
//!
//! Theory of operation:
//! - **Which datagrams.** UDP from a peer to exactly the `-D` address and
//!   port is a query for this server. The same address on another port, or
//!   over another protocol, is forwarded like any other destination.
//! - **A and AAAA (class IN)** are answered from the host's own name
//!   resolution, so `/etc/hosts`, nsswitch and platforms without a
//!   resolv.conf (Android) behave as they do for host programs. The core asks
//!   the driver to resolve the name ([`SocketAction::DnsResolve`]); the
//!   driver looks it up for both families at once (getaddrinfo with
//!   `AF_UNSPEC`), which is what tells a name that does not exist (NXDOMAIN)
//!   from a name without addresses of the asked family (NOERROR, no
//!   answers): glibc reports a v4-only `/etc/hosts` name asked for v6 alone
//!   as a lookup failure, not as "no data". The answer holds exactly the
//!   asked type, with a TTL of [`TTL`] seconds.
//! - **Every other type or class** (MX, TXT, SRV, PTR, ANY, …) is forwarded:
//!   the raw query goes to the nameservers of the host's resolv.conf
//!   ([`SocketAction::DnsForward`]) and their answer comes back unchanged,
//!   EDNS included, except for the ID (the driver sends a random one
//!   upstream and this module restores the client's). An answer whose
//!   question differs from the query's is refused (SERVFAIL). With no
//!   usable nameserver the answer is NOTIMP.
//! - **Bounded in count and time.** At most `max_in_flight` queries of each
//!   peer wait for the driver; one more from that peer is answered SERVFAIL
//!   at once, counted, and logged
//!   at most once per [`super::limit::LIMIT_LOG_INTERVAL`]. Each waiting
//!   query has a deadline `timeout` after its arrival; at the deadline it is
//!   answered SERVFAIL and the driver is told to give up
//!   ([`SocketAction::DnsCancel`]). So every well-formed query is answered
//!   exactly once, within the timeout; a late result is ignored.
//! - **Malformed input.** A datagram too short for a header, or one that is
//!   itself a response, is dropped. A readable header with an unreadable
//!   body, a question count other than one or a compressed question name
//!   gets FORMERR (header only); an opcode other than QUERY gets NOTIMP.
//!   Parsing goes through `simple_dns`, after a check that the section counts
//!   fit the message, so a hostile count cannot make it allocate much.
//! - **Size.** An answer fits the client's limit: 512 bytes, or the EDNS
//!   size it advertised, and never more than the transport allows (the
//!   tunnel MTU less the IP and UDP headers). A local answer that does not
//!   fit keeps the records that do and sets TC; an upstream answer that does
//!   not fit is cut to its header and question, with TC set, so the client
//!   retries over TCP.
//! - **Transport.** [`DnsClient`] says where an answer goes: a UDP datagram,
//!   or a TCP connection to the same address, which [`super::dns_tcp`]
//!   serves with length-prefixed messages and a limit of 65535 bytes.
//! - **Not done:** caching (the host's resolver may cache), SOA records for
//!   negative answers, DNSSEC (the DO bit is not honoured by local answers),
//!   EDNS version negotiation (BADVERS) for local answers, and PTR answers
//!   from `/etc/hosts` (PTR queries are forwarded).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::limit::LimitLog;
use super::peers::PeerId;
use super::{SocketAction, Stats};

/// TTL of the records in local answers, in seconds.
pub const TTL: u32 = 60;

/// The largest answer to a client that did not advertise an EDNS size.
const MIN_UDP_SIZE: usize = 512;
const HEADER_LEN: usize = 12;
/// The OPT record we add: root name, type, class (size), TTL, empty RDATA.
const OPT_LEN: usize = 11;
/// Smallest record: root name (1), type, class, TTL, RDLENGTH.
const MIN_RECORD_LEN: usize = 11;
/// Smallest question: root name (1), type, class.
const MIN_QUESTION_LEN: usize = 5;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// Response codes (RFC 1035 §4.1.1).
mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
}

/// Header flag bits, in the third and fourth bytes.
mod flag {
    pub const QR: u8 = 0x80;
    pub const OPCODE: u8 = 0x78;
    pub const TC: u8 = 0x02;
    pub const RD: u8 = 0x01;
    pub const RA: u8 = 0x80;
    pub const CD: u8 = 0x10;
    pub const RCODE: u8 = 0x0f;
}

/// Names a query while the driver works on it. Never reused, so a late
/// result for a query that has timed out finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsQueryId(pub u64);

/// Where the answer to a query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsClient {
    /// A UDP datagram from `peer` to the server's address.
    Udp {
        /// The peer-side endpoint that asked.
        peer: SocketAddr,
    },
    /// A message on the TCP connection `flow` to the server's address.
    Tcp {
        /// The connection.
        flow: super::FlowId,
    },
}

/// What the driver found for a query, fed back with
/// [`super::Router::handle_dns_result`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsOutcome {
    /// [`SocketAction::DnsResolve`]: the name exists, with these addresses
    /// of either family (possibly none: "no data").
    Addresses(Vec<IpAddr>),
    /// [`SocketAction::DnsResolve`]: the name does not exist.
    NoSuchName,
    /// [`SocketAction::DnsForward`]: a nameserver's answer, with the ID it
    /// was sent with restored or not (this module sets it).
    Upstream(Bytes),
    /// [`SocketAction::DnsForward`]: the host has no nameserver to ask.
    NoNameserver,
    /// Either: the lookup failed (a temporary failure, every nameserver
    /// unreachable or silent, a resolver error).
    Failed,
}

/// An answer for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// Where it goes.
    pub client: DnsClient,
    /// The DNS message.
    pub message: Vec<u8>,
}

/// A query waiting for the driver.
struct Pending {
    client: DnsClient,
    owner: PeerId,
    /// The request header's ID and flag bytes.
    id: [u8; 2],
    flags: [u8; 2],
    /// The question as the client wrote it: name, type, class.
    question: Vec<u8>,
    qtype: u16,
    /// Whether the client sent an OPT record (our answers then carry one).
    edns: bool,
    /// The largest answer the client and the transport take.
    max_len: usize,
    deadline: Instant,
}

/// A query parsed far enough to act on it.
struct Query<'a> {
    id: [u8; 2],
    flags: [u8; 2],
    question: &'a [u8],
    qtype: u16,
    qclass: u16,
    edns_size: Option<u16>,
}

/// Why a query is not taken.
enum Reject {
    /// Not worth an answer: no readable header, or it is a response.
    Drop,
    /// Answer with this code and the request header only.
    Error(u8),
}

/// The DNS server's queries in flight and its policy.
pub struct DnsServer {
    addr: SocketAddr,
    timeout: Duration,
    max_in_flight: usize,
    next_id: u64,
    over_capacity_log: LimitLog,
    pending: HashMap<DnsQueryId, Pending>,
    deadlines: BTreeSet<(Instant, DnsQueryId)>,
    /// Queries in flight per peer; a peer with none has no entry.
    per_owner: HashMap<PeerId, usize>,
}

impl DnsServer {
    /// A server at `addr` that gives up on a query after `timeout` and has
    /// at most `max_in_flight` queries of each peer waiting for the driver.
    pub fn new(addr: SocketAddr, timeout: Duration, max_in_flight: usize) -> Self {
        DnsServer {
            addr,
            timeout,
            max_in_flight,
            next_id: 0,
            over_capacity_log: LimitLog::default(),
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
            per_owner: HashMap::new(),
        }
    }

    /// The server's address inside the tunnel.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries waiting for the driver.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Queries of `owner` waiting for the driver.
    pub fn in_flight_of(&self, owner: PeerId) -> usize {
        self.per_owner.get(&owner).copied().unwrap_or(0)
    }

    /// Gives up every query of `owner`, unanswered; returns how many.
    pub fn close_owner(&mut self, owner: PeerId, actions: &mut VecDeque<SocketAction>) -> usize {
        let queries: Vec<DnsQueryId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.owner == owner)
            .map(|(&id, _)| id)
            .collect();
        for &query in &queries {
            self.take(query);
            actions.push_back(SocketAction::DnsCancel { query });
        }
        queries.len()
    }

    /// Removes `query` from the tables.
    fn take(&mut self, query: DnsQueryId) -> Option<Pending> {
        let pending = self.pending.remove(&query)?;
        self.deadlines.remove(&(pending.deadline, query));
        if let Some(n) = self.per_owner.get_mut(&pending.owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&pending.owner);
            }
        }
        Some(pending)
    }

    /// Whether a query from `client` is still waiting for its answer.
    pub fn is_waiting_for(&self, client: DnsClient) -> bool {
        self.pending
            .values()
            .any(|pending| pending.client == client)
    }

    /// A query `message` from `client`, of peer `owner`, whose transport
    /// carries at most `transport_max` bytes back. Returns the answer if
    /// there is one at once; otherwise the query waits for the driver, asked
    /// through `actions`, or is dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn query(
        &mut self,
        now: Instant,
        owner: PeerId,
        client: DnsClient,
        message: &[u8],
        transport_max: usize,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) -> Option<Vec<u8>> {
        stats.dns_queries += 1;
        let query = match parse_query(message) {
            Ok(query) => query,
            Err(Reject::Drop) => {
                tracing::trace!(len = message.len(), "dropped DNS datagram: not a query");
                stats.dns_dropped += 1;
                return None;
            }
            Err(Reject::Error(code)) => {
                tracing::trace!(len = message.len(), code, "malformed DNS query");
                stats.dns_errors += 1;
                let header = [message[0], message[1], message[2], message[3]];
                return Some(header_only(header, code));
            }
        };
        let edns = query.edns_size.is_some();
        // Over TCP only the transport limits the answer (RFC 7766 §8).
        let client_max = match client {
            DnsClient::Udp { .. } => query
                .edns_size
                .map_or(MIN_UDP_SIZE, |size| usize::from(size).max(MIN_UDP_SIZE)),
            DnsClient::Tcp { .. } => usize::from(u16::MAX),
        };
        let max_len = client_max.min(transport_max);
        let reply = |code: u8| {
            build_answer(
                query.id,
                query.flags,
                query.question,
                code,
                edns,
                max_len,
                &[],
            )
        };
        if self.in_flight_of(owner) >= self.max_in_flight {
            tracing::trace!(
                in_flight = self.in_flight_of(owner),
                "DNS query refused: too many in flight"
            );
            stats.dns_over_capacity += 1;
            stats.dns_servfail += 1;
            if let Some(refused) = self.over_capacity_log.hit(now) {
                tracing::warn!(
                    refused,
                    "--max-dns-queries reached by a peer: its new DNS queries answered SERVFAIL"
                );
            }
            return Some(reply(rcode::SERVFAIL));
        }
        let id = DnsQueryId(self.next_id);
        let action = if query.qclass == CLASS_IN && matches!(query.qtype, TYPE_A | TYPE_AAAA) {
            match host_name(query.question) {
                HostName::Name(name) => SocketAction::DnsResolve { query: id, name },
                HostName::Root => return Some(reply(rcode::NOERROR)),
                HostName::Impossible => {
                    stats.dns_nxdomain += 1;
                    return Some(reply(rcode::NXDOMAIN));
                }
            }
        } else {
            stats.dns_forwarded += 1;
            SocketAction::DnsForward {
                query: id,
                message: Bytes::copy_from_slice(message),
            }
        };
        self.next_id += 1;
        let deadline = now + self.timeout;
        self.pending.insert(
            id,
            Pending {
                client,
                owner,
                id: query.id,
                flags: query.flags,
                question: query.question.to_vec(),
                qtype: query.qtype,
                edns,
                max_len,
                deadline,
            },
        );
        self.deadlines.insert((deadline, id));
        *self.per_owner.entry(owner).or_default() += 1;
        actions.push_back(action);
        None
    }

    /// The driver's result for `query`. Returns the answer, or `None` if the
    /// query is no longer waiting (it timed out).
    pub fn complete(
        &mut self,
        query: DnsQueryId,
        outcome: DnsOutcome,
        stats: &mut Stats,
    ) -> Option<DnsAnswer> {
        let pending = self.take(query)?;
        let answer = |code: u8, addresses: &[IpAddr]| {
            build_answer(
                pending.id,
                pending.flags,
                &pending.question,
                code,
                pending.edns,
                pending.max_len,
                addresses,
            )
        };
        let message = match outcome {
            DnsOutcome::Addresses(mut addresses) => {
                let mut seen = Vec::with_capacity(addresses.len());
                addresses.retain(|a| {
                    let keep = a.is_ipv4() == (pending.qtype == TYPE_A) && !seen.contains(a);
                    seen.push(*a);
                    keep
                });
                stats.dns_resolved += 1;
                answer(rcode::NOERROR, &addresses)
            }
            DnsOutcome::NoSuchName => {
                stats.dns_nxdomain += 1;
                answer(rcode::NXDOMAIN, &[])
            }
            DnsOutcome::NoNameserver => answer(rcode::NOTIMP, &[]),
            DnsOutcome::Failed => {
                stats.dns_servfail += 1;
                answer(rcode::SERVFAIL, &[])
            }
            DnsOutcome::Upstream(message) => match relay_upstream(&pending, &message) {
                Some(message) => message,
                None => {
                    tracing::trace!(
                        query = query.0,
                        "upstream DNS answer does not match the query"
                    );
                    stats.dns_servfail += 1;
                    answer(rcode::SERVFAIL, &[])
                }
            },
        };
        if message.len() > HEADER_LEN && message[2] & flag::TC != 0 {
            stats.dns_truncated += 1;
        }
        Some(DnsAnswer {
            client: pending.client,
            message,
        })
    }

    /// Answers SERVFAIL to every query whose deadline has passed, and tells
    /// the driver to give up on it.
    pub fn expire(
        &mut self,
        now: Instant,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
        mut answer: impl FnMut(DnsAnswer),
    ) {
        while let Some(&(deadline, query)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let Some(pending) = self.take(query) else {
                self.deadlines.pop_first();
                continue;
            };
            tracing::trace!(query = query.0, "DNS query timed out");
            stats.dns_timeouts += 1;
            stats.dns_servfail += 1;
            actions.push_back(SocketAction::DnsCancel { query });
            answer(DnsAnswer {
                client: pending.client,
                message: build_answer(
                    pending.id,
                    pending.flags,
                    &pending.question,
                    rcode::SERVFAIL,
                    pending.edns,
                    pending.max_len,
                    &[],
                ),
            });
        }
    }

    /// Gives up on every query in flight without answering it (shutdown):
    /// the driver is told to cancel each.
    pub fn cancel_all(&mut self, actions: &mut VecDeque<SocketAction>) {
        self.deadlines.clear();
        for (query, _) in self.pending.drain() {
            actions.push_back(SocketAction::DnsCancel { query });
        }
    }

    /// The next query deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }
}

/// Reads a query. Everything past the header is checked by `simple_dns`,
/// and the question is located by hand (it must not be compressed).
fn parse_query(message: &[u8]) -> Result<Query<'_>, Reject> {
    let Some(header) = message.get(..HEADER_LEN) else {
        return Err(Reject::Drop);
    };
    if header[2] & flag::QR != 0 {
        return Err(Reject::Drop);
    }
    if header[2] & flag::OPCODE != 0 {
        return Err(Reject::Error(rcode::NOTIMP));
    }
    let count = |at: usize| usize::from(u16::from_be_bytes([header[at], header[at + 1]]));
    let (questions, records) = (count(4), count(6) + count(8) + count(10));
    // A count that the message cannot hold is malformed; checking first keeps
    // the parser from reserving room for 65535 records.
    let body = message.len() - HEADER_LEN;
    if questions != 1 || MIN_QUESTION_LEN + records * MIN_RECORD_LEN > body {
        return Err(Reject::Error(rcode::FORMERR));
    }
    let packet = simple_dns::Packet::parse(message).map_err(|_| Reject::Error(rcode::FORMERR))?;
    let opts = packet
        .additional_records
        .iter()
        .filter(|record| record.rdata.type_code() == simple_dns::TYPE::OPT)
        .count();
    if opts > 0 {
        // `simple_dns` takes the first OPT record out; a second one is an error
        // (RFC 6891 §6.1.1).
        return Err(Reject::Error(rcode::FORMERR));
    }
    let edns_size = packet.opt().map(|opt| opt.udp_packet_size);
    let name_end = question_name_end(message).ok_or(Reject::Error(rcode::FORMERR))?;
    let question = message
        .get(HEADER_LEN..name_end + 4)
        .ok_or(Reject::Error(rcode::FORMERR))?;
    let field = |at: usize| u16::from_be_bytes([message[at], message[at + 1]]);
    Ok(Query {
        id: [header[0], header[1]],
        flags: [header[2], header[3]],
        question,
        qtype: field(name_end),
        qclass: field(name_end + 2),
        edns_size,
    })
}

/// The offset just past the question's name, which starts right after the
/// header; `None` if it is truncated or compressed.
fn question_name_end(message: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*message.get(at)?);
        if len == 0 {
            return Some(at + 1);
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
}

/// A question's name, as the host resolver would be asked for it.
enum HostName {
    /// Dotted, without the trailing dot: glibc does not match `/etc/hosts`
    /// entries against a name with one.
    Name(String),
    /// The root: it exists but has no addresses.
    Root,
    /// No host name can look like this (bytes a resolver cannot take, or an
    /// IP address literal, which getaddrinfo would echo back).
    Impossible,
}

fn host_name(question: &[u8]) -> HostName {
    let mut name = String::new();
    let mut at = 0;
    while let Some(&len) = question.get(at) {
        let len = usize::from(len);
        if len == 0 {
            break;
        }
        let Some(label) = question.get(at + 1..at + 1 + len) else {
            return HostName::Impossible;
        };
        if !label
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'.' && b != b'\\')
        {
            return HostName::Impossible;
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|&b| char::from(b)));
        at += 1 + len;
    }
    if name.is_empty() {
        HostName::Root
    } else if name.parse::<IpAddr>().is_ok() {
        HostName::Impossible
    } else {
        HostName::Name(name)
    }
}

/// A response carrying only the request's header bits and `code`, no
/// sections: for requests whose question cannot be echoed.
fn header_only(request: [u8; 4], code: u8) -> Vec<u8> {
    let mut message = vec![0; HEADER_LEN];
    message[..2].copy_from_slice(&request[..2]);
    message[2] = flag::QR | (request[2] & (flag::OPCODE | flag::RD));
    message[3] = flag::RA | (request[3] & flag::CD) | code;
    message
}

/// A response to a question: the question echoed, then one record per
/// address (all of the asked type), then an OPT record if the client sent
/// one. Records that would take the message over `max_len` are left out and
/// TC is set.
fn build_answer(
    id: [u8; 2],
    flags: [u8; 2],
    question: &[u8],
    code: u8,
    edns: bool,
    max_len: usize,
    addresses: &[IpAddr],
) -> Vec<u8> {
    let opt_len = if edns { OPT_LEN } else { 0 };
    let base = HEADER_LEN + question.len() + opt_len;
    let mut fitting = 0;
    let mut len = base;
    for address in addresses {
        let record = 12 + if address.is_ipv4() { 4 } else { 16 };
        if len + record > max_len {
            break;
        }
        len += record;
        fitting += 1;
    }
    let truncated = fitting < addresses.len();
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&id);
    let tc = if truncated { flag::TC } else { 0 };
    message.push(flag::QR | (flags[0] & (flag::OPCODE | flag::RD)) | tc);
    message.push(flag::RA | (flags[1] & flag::CD) | (code & flag::RCODE));
    let fitting_count = u16::try_from(fitting).unwrap_or(u16::MAX);
    for count in [1, fitting_count, 0, u16::from(edns)] {
        message.extend_from_slice(&count.to_be_bytes());
    }
    message.extend_from_slice(question);
    for address in &addresses[..fitting] {
        // The owner name points at the question's name, right after the header.
        message.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
        let (rtype, data): (u16, &[u8]) = match address {
            IpAddr::V4(v4) => (TYPE_A, &v4.octets()[..]),
            IpAddr::V6(v6) => (TYPE_AAAA, &v6.octets()[..]),
        };
        message.extend_from_slice(&rtype.to_be_bytes());
        message.extend_from_slice(&CLASS_IN.to_be_bytes());
        message.extend_from_slice(&TTL.to_be_bytes());
        message.extend_from_slice(&(data.len() as u16).to_be_bytes());
        message.extend_from_slice(data);
    }
    if edns {
        // Advertise what this transport carries back; never below 512.
        let size = u16::try_from(max_len.max(MIN_UDP_SIZE)).unwrap_or(u16::MAX);
        message.push(0);
        message.extend_from_slice(&TYPE_OPT.to_be_bytes());
        message.extend_from_slice(&size.to_be_bytes());
        message.extend_from_slice(&[0; 6]);
    }
    message
}

/// An upstream answer for the client: the client's ID restored, cut to its
/// header and question with TC set if it does not fit. `None` if it is not
/// an answer to this question.
fn relay_upstream(pending: &Pending, upstream: &[u8]) -> Option<Vec<u8>> {
    let question_end = HEADER_LEN + pending.question.len();
    let header = upstream.get(..HEADER_LEN)?;
    let question = upstream.get(HEADER_LEN..question_end)?;
    let is_answer = header[2] & flag::QR != 0 && header[4..6] == [0, 1];
    if !is_answer || !question.eq_ignore_ascii_case(&pending.question) {
        return None;
    }
    if upstream.len() <= pending.max_len {
        let mut message = upstream.to_vec();
        message[..2].copy_from_slice(&pending.id);
        return Some(message);
    }
    let mut message = upstream[..question_end].to_vec();
    message[..2].copy_from_slice(&pending.id);
    message[2] |= flag::TC;
    message[6..HEADER_LEN].fill(0);
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query as `dig` makes it: RD set, and with `edns` an OPT record
    /// advertising that size.
    pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0; 6]);
        }
        m
    }

    #[test]
    fn question_name_end_rejects_compression_and_truncation() {
        let q = query(1, "a.bc", TYPE_A, None);
        assert_eq!(question_name_end(&q), Some(HEADER_LEN + 6));
        let mut compressed = q[..HEADER_LEN].to_vec();
        compressed.extend_from_slice(&[0xc0, 0x00, 0, 1, 0, 1]);
        assert_eq!(question_name_end(&compressed), None);
        assert_eq!(question_name_end(&q[..HEADER_LEN + 3]), None);
    }

    #[test]
    fn host_names() {
        let name = |text: &str| {
            let q = query(1, text, TYPE_A, None);
            host_name(&q[HEADER_LEN..])
        };
        assert!(matches!(name("Internet.Test"), HostName::Name(n) if n == "Internet.Test"));
        assert!(matches!(name(""), HostName::Root));
        assert!(matches!(name("198.18.2.2"), HostName::Impossible));
        assert!(matches!(name("a b.test"), HostName::Impossible));
    }

    #[test]
    fn every_prefix_and_mutation_of_a_query_is_handled() {
        let mut server = DnsServer::new("10.0.0.1:53".parse().unwrap(), Duration::from_secs(5), 4);
        let client = DnsClient::Udp {
            peer: "10.0.0.2:5000".parse().unwrap(),
        };
        let (mut actions, mut stats) = (VecDeque::new(), Stats::default());
        let now = Instant::now();
        let original = query(7, "example.test", 15, Some(1232));
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..20_000 {
            let mut message = original.clone();
            if round < original.len() {
                message.truncate(round);
            } else {
                for _ in 0..3 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let at = (seed >> 16) as usize % message.len();
                    message[at] = (seed >> 40) as u8;
                }
            }
            if let Some(answer) = server.query(
                now,
                PeerId(0),
                client,
                &message,
                1392,
                &mut actions,
                &mut stats,
            ) {
                assert!(answer.len() >= HEADER_LEN && answer.len() <= 1392);
                assert_eq!(answer[..2], message[..2], "ID not preserved");
            }
            // Keep room for more: complete whatever was accepted.
            while let Some(action) = actions.pop_front() {
                if let SocketAction::DnsResolve { query, .. }
                | SocketAction::DnsForward { query, .. } = action
                {
                    server.complete(query, DnsOutcome::Failed, &mut stats);
                }
            }
        }
        assert_eq!(server.in_flight(), 0);
    }
}
