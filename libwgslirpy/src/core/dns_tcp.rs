//! DNS over TCP at the `-D` address: connections served inside the router.
//!
//! Theory of operation: a TCP connection to the DNS server's address and
//! port is terminated by the TCP state machine like any other, but its
//! "host socket" is this module instead of a real one. The router keeps the
//! socket actions that TCP emits for such a flow to itself:
//! - `TcpConnect` succeeds at once;
//! - `TcpWrite` bytes are framed into length-prefixed DNS messages (RFC
//!   1035 §4.2.2), each handed to the DNS server; bytes count as written
//!   only when their message is taken, so TCP's window closes while
//!   answers pile up unread;
//! - `TcpRead` credit lets framed answers flow back to the peer;
//! - `TcpShutdownWrite` (the peer's FIN) ends the connection once every
//!   query has been answered and the answers sent: then this side closes
//!   too;
//! - `TcpClose`/`TcpAbort` forget the connection; late answers are dropped.
//!
//! Memory per connection: the peer's unframed bytes (at most the TCP
//! buffer size) and answers not yet read, at most [`MAX_BACKLOG`] plus one
//! answer, since no query is taken while the backlog is full.

use std::collections::HashMap;

use super::FlowId;

/// Answer bytes waiting for the peer beyond which no more queries are taken.
pub const MAX_BACKLOG: usize = 64 * 1024;

/// One connection's framing state.
#[derive(Debug, Default)]
struct Conn {
    /// Bytes from the peer not yet framed into a message.
    input: Vec<u8>,
    /// Framed answers not yet handed to TCP.
    output: Vec<u8>,
    /// Bytes TCP may take from us now.
    credit: usize,
    /// The peer has sent its FIN.
    peer_done: bool,
    /// We have ended our direction.
    closed: bool,
}

/// What to do for a connection after an event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Complete queries to hand to the DNS server, in order.
    pub queries: Vec<Vec<u8>>,
    /// Bytes of input consumed (report as written to TCP).
    pub consumed: usize,
    /// Answer bytes to hand to TCP as data from the "socket".
    pub data: Vec<u8>,
}

/// The DNS-over-TCP connections.
#[derive(Debug, Default)]
pub struct DnsTcp {
    conns: HashMap<FlowId, Conn>,
}

impl DnsTcp {
    /// Whether `flow` is a DNS-over-TCP connection.
    pub fn serves(&self, flow: FlowId) -> bool {
        self.conns.contains_key(&flow)
    }

    /// A new connection.
    pub fn open(&mut self, flow: FlowId) {
        self.conns.insert(flow, Conn::default());
    }

    /// Forgets a connection.
    pub fn close(&mut self, flow: FlowId) {
        self.conns.remove(&flow);
    }

    /// Bytes from the peer.
    pub fn input(&mut self, flow: FlowId, data: &[u8]) {
        if let Some(conn) = self.conns.get_mut(&flow) {
            conn.input.extend_from_slice(data);
        }
    }

    /// More read credit from TCP.
    pub fn credit(&mut self, flow: FlowId, max: usize) {
        if let Some(conn) = self.conns.get_mut(&flow) {
            conn.credit += max;
        }
    }

    /// The peer has finished sending.
    pub fn peer_done(&mut self, flow: FlowId) {
        if let Some(conn) = self.conns.get_mut(&flow) {
            conn.peer_done = true;
        }
    }

    /// An answer for a query of `flow`.
    pub fn answer(&mut self, flow: FlowId, message: &[u8]) {
        let Some(conn) = self.conns.get_mut(&flow) else {
            return;
        };
        let Ok(len) = u16::try_from(message.len()) else {
            return;
        };
        conn.output.extend_from_slice(&len.to_be_bytes());
        conn.output.extend_from_slice(message);
    }

    /// Takes the complete queries that may go to the server now, and the
    /// answers that may go to the peer.
    pub fn step(&mut self, flow: FlowId) -> Step {
        let mut step = Step::default();
        let Some(conn) = self.conns.get_mut(&flow) else {
            return step;
        };
        let mut at = 0;
        while conn.output.len() < MAX_BACKLOG {
            let Some(len) = conn.input.get(at..at + 2) else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let Some(message) = conn.input.get(at + 2..at + 2 + len) else {
                break;
            };
            step.queries.push(message.to_vec());
            at += 2 + len;
        }
        conn.input.drain(..at);
        step.consumed = at;
        let n = conn.credit.min(conn.output.len());
        step.data = conn.output.drain(..n).collect();
        conn.credit -= n;
        step
    }

    /// Whether `flow` should now end its direction: the peer is done, every
    /// query has been taken, and every answer sent. `waiting` says whether
    /// the DNS server still owes it an answer. True once.
    pub fn should_close(&mut self, flow: FlowId, waiting: bool) -> bool {
        let Some(conn) = self.conns.get_mut(&flow) else {
            return false;
        };
        let done = conn.peer_done && !waiting && conn.output.is_empty() && !conn.closed;
        // A partial message left at the peer's FIN can never complete.
        if done {
            conn.closed = true;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = (message.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn messages_are_framed_across_segments() {
        let mut dns = DnsTcp::default();
        let flow = FlowId(1);
        dns.open(flow);
        let stream = [framed(b"first"), framed(b"second")].concat();
        dns.input(flow, &stream[..4]);
        assert_eq!(dns.step(flow), Step::default());
        dns.input(flow, &stream[4..]);
        let step = dns.step(flow);
        assert_eq!(step.queries, vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!(step.consumed, stream.len());
    }

    #[test]
    fn answers_wait_for_credit() {
        let mut dns = DnsTcp::default();
        let flow = FlowId(1);
        dns.open(flow);
        dns.answer(flow, b"answer");
        assert!(dns.step(flow).data.is_empty());
        dns.credit(flow, 3);
        assert_eq!(dns.step(flow).data, vec![0, 6, b'a']);
        dns.credit(flow, 100);
        assert_eq!(dns.step(flow).data, b"nswer".to_vec());
    }

    #[test]
    fn a_full_backlog_stops_taking_queries() {
        let mut dns = DnsTcp::default();
        let flow = FlowId(1);
        dns.open(flow);
        dns.answer(flow, &vec![0; MAX_BACKLOG - 2]);
        dns.input(flow, &framed(b"query"));
        let step = dns.step(flow);
        assert!(step.queries.is_empty() && step.consumed == 0);
        dns.credit(flow, usize::MAX / 2);
        dns.step(flow);
        assert_eq!(dns.step(flow).queries, vec![b"query".to_vec()]);
    }

    #[test]
    fn closes_once_everything_is_answered_and_sent() {
        let mut dns = DnsTcp::default();
        let flow = FlowId(1);
        dns.open(flow);
        dns.peer_done(flow);
        assert!(!dns.should_close(flow, true));
        dns.answer(flow, b"late");
        assert!(!dns.should_close(flow, false));
        dns.credit(flow, 100);
        dns.step(flow);
        assert!(dns.should_close(flow, false));
        assert!(!dns.should_close(flow, false));
    }
}
