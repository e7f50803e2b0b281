//! TCP router tests: a scripted peer sends segments built with the packet
//! builders, a fake driver answers socket actions, time is virtual.

use std::time::Duration;

use super::packet::TcpSegment;
use super::tcp::DELAYED_ACK;
use super::*;
use crate::config::Transport;

const PEER: &str = "10.0.2.15:40000";
const REMOTE: &str = "198.18.2.2:80";
const PEER_ISN: u32 = 1000;
/// The MSS we advertise to an IPv4 peer with the default MTU.
const MSS: usize = 1420 - 40;

fn config() -> Config {
    Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        "127.0.0.1:0".parse().unwrap(),
    )
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A segment the router sent, owned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seg {
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    window: u16,
    wscale: Option<u8>,
    mss: Option<u16>,
    payload: Vec<u8>,
}

/// What came out of the router toward the peer.
#[derive(Debug)]
enum Out {
    Tcp(Seg),
    /// ICMP or ICMPv6 type and code.
    Icmp(u8, u8),
}

struct Harness {
    router: Router,
    now: Instant,
    peer: SocketAddr,
    remote: SocketAddr,
    /// Our next sequence number as the peer.
    seq: u32,
    /// What we acknowledge as the peer.
    ack: u32,
    window: u16,
}

impl Harness {
    fn new(config: &Config) -> Self {
        Self::with_addrs(config, sa(PEER), sa(REMOTE))
    }

    fn with_addrs(config: &Config, peer: SocketAddr, remote: SocketAddr) -> Self {
        Harness {
            router: Router::with_secret(config, [7; 16]),
            now: Instant::now(),
            peer,
            remote,
            seq: PEER_ISN,
            ack: 0,
            window: 65535,
        }
    }

    /// Hands the router the packet, as the driver does.
    fn send(&mut self, segment: TcpSegment<'_>) {
        let packet = packet::build_tcp(self.peer, self.remote, &segment).unwrap();
        self.router.handle_owned_packet(self.now, packet.freeze());
    }

    /// Sends `data` (and FIN) at the peer's next sequence number, acking.
    fn send_data(&mut self, data: &[u8], fin: bool) {
        let segment = TcpSegment {
            seq: self.seq,
            ack: Some(self.ack),
            fin,
            window: self.window,
            payload: data,
            ..TcpSegment::default()
        };
        self.send(segment);
        self.seq = self.seq.wrapping_add(data.len() as u32 + u32::from(fin));
    }

    /// Sends a pure ACK of `ack` with `window`.
    fn send_ack(&mut self, ack: u32, window: u16) {
        self.ack = ack;
        self.window = window;
        self.send(TcpSegment {
            seq: self.seq,
            ack: Some(ack),
            window,
            ..TcpSegment::default()
        });
    }

    fn actions(&mut self) -> Vec<SocketAction> {
        std::iter::from_fn(|| self.router.poll_socket_action()).collect()
    }

    fn out(&mut self) -> Vec<Out> {
        std::iter::from_fn(|| self.router.poll_transmit())
            .map(|p| match packet::parse(&p) {
                Ok(Parsed::Tcp { src, dst, segment }) => {
                    assert_eq!((src, dst), (self.remote, self.peer), "misaddressed");
                    Out::Tcp(Seg {
                        seq: segment.seq,
                        ack: segment.ack,
                        syn: segment.syn,
                        fin: segment.fin,
                        rst: segment.rst,
                        window: segment.window,
                        wscale: segment.wscale,
                        mss: segment.mss,
                        payload: segment.payload.to_vec(),
                    })
                }
                _ => {
                    let header = if self.peer.is_ipv6() { 40 } else { 20 };
                    Out::Icmp(p[header], p[header + 1])
                }
            })
            .collect()
    }

    fn segs(&mut self) -> Vec<Seg> {
        self.out()
            .into_iter()
            .map(|o| match o {
                Out::Tcp(s) => s,
                Out::Icmp(..) => panic!("unexpected ICMP"),
            })
            .collect()
    }

    /// The one segment sent now; fails if there is not exactly one.
    #[track_caller]
    fn one_seg(&mut self) -> Seg {
        let mut segs = self.segs();
        assert_eq!(segs.len(), 1, "{segs:?}");
        segs.remove(0)
    }

    /// Moves the clock on by `by`, running the timers on the way.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(at) = self.router.poll_timeout() {
            if at > until {
                break;
            }
            self.now = at.max(self.now);
            self.router.handle_timeout(self.now);
        }
        self.now = until;
    }

    fn syn(&mut self, wscale: Option<u8>) {
        self.send(TcpSegment {
            seq: PEER_ISN,
            syn: true,
            window: 64240,
            wscale,
            mss: Some(1460),
            ..TcpSegment::default()
        });
    }

    /// SYN, connect, SYN-ACK, ACK. Returns the flow and the router's
    /// first data sequence number.
    fn establish(&mut self) -> (FlowId, u32) {
        self.syn(Some(7));
        let [SocketAction::TcpConnect { flow, dest }] = self.actions()[..] else {
            panic!("no connect");
        };
        assert_eq!(dest, self.remote);
        self.router.handle_tcp_connected(self.now, flow);
        let syn_ack = self.segs().pop().expect("SYN-ACK");
        assert!(syn_ack.syn && syn_ack.ack == Some(PEER_ISN + 1));
        self.seq = PEER_ISN + 1;
        let first = syn_ack.seq.wrapping_add(1);
        self.window = 512; // scaled by 7: 64 KiB
        self.send_ack(first, 512);
        self.actions();
        (flow, first)
    }
}

fn writes(actions: &[SocketAction]) -> Vec<u8> {
    actions
        .iter()
        .filter_map(|a| match a {
            SocketAction::TcpWrite { data, .. } => Some(&data[..]),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn handshake_waits_for_the_host_connect() {
    let mut h = Harness::new(&config());
    h.syn(Some(7));
    let acts = h.actions();
    let [SocketAction::TcpConnect { flow, dest }] = acts[..] else {
        panic!("{acts:?}");
    };
    assert_eq!(dest, sa(REMOTE));
    assert!(h.out().is_empty(), "no SYN-ACK before the connect succeeds");

    h.router.handle_tcp_connected(h.now, flow);
    assert_eq!(
        h.actions(),
        vec![SocketAction::TcpRead { flow, max: 65535 }]
    );
    let segs = h.segs();
    let [syn_ack] = &segs[..] else {
        panic!("{segs:?}");
    };
    assert!(syn_ack.syn && !syn_ack.rst);
    assert_eq!(syn_ack.ack, Some(PEER_ISN + 1));
    assert_eq!(syn_ack.mss, Some(1420 - 40));
    assert_eq!(
        syn_ack.wscale,
        Some(0),
        "65535-byte buffer needs no scaling"
    );
    assert_eq!(syn_ack.window, 65535);
    assert_eq!(h.router.stats().tcp_connects, 1);
}

#[test]
fn ipv6_mss_and_no_wscale_without_the_peers_offer() {
    let mut h = Harness::with_addrs(&config(), sa("[fd77::2]:5000"), sa("[fd00:2::2]:80"));
    h.syn(None);
    let [SocketAction::TcpConnect { flow, .. }] = h.actions()[..] else {
        panic!("no connect");
    };
    h.router.handle_tcp_connected(h.now, flow);
    let syn_ack = h.segs().pop().unwrap();
    assert_eq!(syn_ack.mss, Some(1420 - 60));
    assert_eq!(syn_ack.wscale, None);
}

#[test]
fn retransmitted_syn_while_connecting_creates_nothing() {
    let mut h = Harness::new(&config());
    h.syn(Some(7));
    assert_eq!(h.actions().len(), 1);
    for _ in 0..3 {
        h.advance(Duration::from_secs(1));
        h.syn(Some(7));
        assert!(h.actions().is_empty());
        assert!(h.out().is_empty());
    }
    assert_eq!(h.router.stats().tcp_connects, 1);
}

#[test]
fn refused_connect_gets_rst() {
    let mut h = Harness::new(&config());
    h.syn(None);
    let [SocketAction::TcpConnect { flow, .. }] = h.actions()[..] else {
        panic!("no connect");
    };
    h.router
        .handle_tcp_connect_failed(h.now, flow, ConnectError::Refused);
    let segs = h.segs();
    assert_eq!(
        segs,
        vec![Seg {
            seq: 0,
            ack: Some(PEER_ISN + 1),
            rst: true,
            ..Seg::default()
        }]
    );
    assert_eq!(h.router.poll_timeout(), None, "flow gone");
}

#[test]
fn unreachable_connect_gets_icmp_v4_and_v6() {
    for (peer, remote, net, host) in [
        (PEER, REMOTE, (3, 0), (3, 1)),
        ("[fd77::2]:5000", "[fd00:2::2]:80", (1, 0), (1, 3)),
    ] {
        for (error, expected) in [
            (ConnectError::NetUnreachable, net),
            (ConnectError::HostUnreachable, host),
        ] {
            let mut h = Harness::with_addrs(&config(), sa(peer), sa(remote));
            h.syn(None);
            let [SocketAction::TcpConnect { flow, .. }] = h.actions()[..] else {
                panic!("no connect");
            };
            h.router.handle_tcp_connect_failed(h.now, flow, error);
            let out = h.out();
            assert!(
                matches!(out[..], [Out::Icmp(t, c)] if (t, c) == expected),
                "{error:?}: {out:?}"
            );
        }
    }
}

#[test]
fn connect_timeout_drops_quietly_and_a_later_syn_retries() {
    let mut config = config();
    config.tcp_connect_timeout = Duration::from_secs(5);
    let mut h = Harness::new(&config);
    h.syn(None);
    let [SocketAction::TcpConnect { flow, .. }] = h.actions()[..] else {
        panic!("no connect");
    };
    h.advance(Duration::from_millis(4999));
    assert!(h.actions().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.actions(), vec![SocketAction::TcpClose { flow }]);
    assert!(h.out().is_empty(), "dropped quietly");
    assert_eq!(h.router.stats().tcp_connect_timeouts, 1);
    h.syn(None);
    assert!(matches!(
        h.actions()[..],
        [SocketAction::TcpConnect { flow: f, .. }] if f != flow
    ));
}

#[test]
fn stray_segments_get_rst_per_rfc_793_and_never_connect() {
    let mut h = Harness::new(&config());
    h.send(TcpSegment {
        seq: 5,
        ack: Some(777),
        window: 100,
        ..TcpSegment::default()
    });
    h.send(TcpSegment {
        seq: 5,
        fin: true,
        payload: b"abc",
        ..TcpSegment::default()
    });
    h.send(TcpSegment {
        seq: 5,
        ack: Some(9),
        rst: true,
        ..TcpSegment::default()
    });
    assert!(h.actions().is_empty(), "no connect for a stray segment");
    let segs = h.segs();
    assert_eq!(
        segs,
        vec![
            Seg {
                seq: 777,
                rst: true,
                ..Seg::default()
            },
            Seg {
                seq: 0,
                ack: Some(5 + 3 + 1),
                rst: true,
                ..Seg::default()
            },
        ]
    );
    assert_eq!(h.router.stats().tcp_stray_segments, 2);
}

#[test]
fn peer_data_reaches_the_host_byte_exact_and_is_acked() {
    let mut h = Harness::new(&config());
    let (_, first) = h.establish();
    let data = pattern(5000);
    for chunk in data.chunks(1380) {
        h.send_data(chunk, false);
    }
    assert_eq!(writes(&h.actions()), data);
    let segs = h.segs();
    // One ACK for the whole batch, with the window shrunk by what is unwritten.
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(segs[0].ack, Some(PEER_ISN + 1 + 5000));
    assert_eq!(segs[0].seq, first);
    assert_eq!(segs[0].window, 65535 - 5000);
}

/// What the host socket gets of a handed-over packet is a view of it, not a
/// copy, unless it is too small to be worth keeping the packet for.
#[test]
fn peer_payloads_reach_the_host_as_views_of_the_packet() {
    let mut h = Harness::new(&config());
    h.establish();
    for (len, viewed) in [(1380, true), (packet::MIN_SHARED - 1, false)] {
        let data = pattern(len);
        let segment = TcpSegment {
            seq: h.seq,
            ack: Some(h.ack),
            window: h.window,
            payload: &data,
            ..TcpSegment::default()
        };
        let packet = packet::build_tcp(h.peer, h.remote, &segment)
            .unwrap()
            .freeze();
        let range = packet.as_ptr_range();
        h.router.handle_owned_packet(h.now, packet);
        h.seq = h.seq.wrapping_add(len as u32);
        let written: Vec<_> = h
            .actions()
            .into_iter()
            .filter_map(|action| match action {
                SocketAction::TcpWrite { data, .. } => Some(data),
                _ => None,
            })
            .collect();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0], data);
        assert_eq!(range.contains(&written[0].as_ptr()), viewed, "{len} bytes");
    }
}

#[test]
fn host_data_reaches_the_peer_in_mss_segments() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    let data = pattern(4000);
    h.router.handle_tcp_data(h.now, flow, &data);
    let segs = h.segs();
    assert_eq!(
        segs.iter().map(|s| s.payload.len()).collect::<Vec<_>>(),
        vec![1380, 1380, 1240]
    );
    assert_eq!(segs[1].seq, first + 1380);
    let got: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(got, data);
    // Acknowledged: nothing left to retransmit, and the driver still has
    // most of its first credit, so none is added yet.
    h.send_ack(first + 4000, 512);
    assert!(h.segs().is_empty());
    assert!(h.actions().is_empty());
    h.advance(Duration::from_secs(60));
    assert!(h.segs().is_empty(), "nothing retransmitted");
}

/// The send buffer is a ring: acknowledged bytes leave its front while new
/// ones come in behind, wrapping around. Segments from either side of the
/// wrap, and a retransmission across it, carry the right bytes.
#[test]
fn host_data_across_the_send_buffers_wrap_stays_byte_exact() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    let stream = pattern(10_000);
    // The ring takes 8 KiB for these.
    h.router.handle_tcp_data(h.now, flow, &stream[..7000]);
    assert_eq!(h.segs().len(), 6);
    // 1000 bytes stay unacknowledged at the front; 3000 new ones wrap, so
    // the first new segment spans the wrap.
    h.send_ack(first + 6000, 512);
    h.router.handle_tcp_data(h.now, flow, &stream[7000..]);
    let fresh = h.segs();
    assert_eq!(fresh[0].seq, first + 7000);
    let sent: Vec<u8> = fresh.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(sent, &stream[7000..]);
    // The retransmissions from the oldest byte on, across the wrap too.
    h.advance(Duration::from_millis(1000));
    let mut retransmitted = h.segs();
    for _ in 0..3 {
        h.send_ack(
            retransmitted[0].seq + retransmitted[0].payload.len() as u32,
            512,
        );
        retransmitted.extend(h.segs());
    }
    assert_eq!(retransmitted[0].seq, first + 6000);
    let again: Vec<u8> = retransmitted
        .iter()
        .flat_map(|s| s.payload.clone())
        .collect();
    assert_eq!(&again[..4000], &stream[6000..]);
}

/// The driver reads the host socket straight into the send buffer: each
/// read is offered the buffer's contiguous free room, within the credit, so
/// across the ring's wrap it takes two reads; the segments carry the bytes
/// exactly, including the one that spans the wrap.
#[test]
fn host_reads_fill_the_send_buffer_in_place_up_to_its_wrap() {
    /// Reads what of `data` the room takes: (room offered, bytes taken).
    fn host_read(h: &mut Harness, flow: FlowId, data: &[u8]) -> Option<(usize, usize)> {
        h.router.handle_tcp_read(h.now, flow, 64 * 1024, |room| {
            let offered = room.remaining_mut();
            let n = offered.min(data.len());
            room.put_slice(&data[..n]);
            (offered, n)
        })
    }
    let mut config = config();
    config.tcp_buffer_size = 8192;
    let mut h = Harness::new(&config);
    let (flow, first) = h.establish();
    let stream = pattern(12_192);
    // An empty buffer starts small; the next read finds it grown.
    assert_eq!(host_read(&mut h, flow, &stream[..4096]), Some((4096, 4096)));
    assert_eq!(
        host_read(&mut h, flow, &stream[4096..5000]),
        Some((4096, 904))
    );
    let sent: Vec<u8> = h.segs().iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(sent, &stream[..5000]);

    // 4000 bytes acknowledged free the ring's front: the credit is offered
    // as the room at the ring's end, then at its start.
    h.send_ack(first + 4000, 512);
    assert_eq!(host_read(&mut h, flow, &stream[5000..]), Some((3192, 3192)));
    assert_eq!(host_read(&mut h, flow, &stream[8192..]), Some((4000, 4000)));
    assert_eq!(host_read(&mut h, flow, b"more"), None, "no credit left");
    let sent: Vec<u8> = h.segs().iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(
        sent,
        &stream[5000..],
        "the segment across the wrap included"
    );
}

#[test]
fn read_credit_never_exceeds_the_buffer_and_is_regranted() {
    let mut config = config();
    config.tcp_buffer_size = 8000;
    let mut h = Harness::new(&config);
    let (flow, first) = h.establish();
    let credit = |acts: Vec<SocketAction>| -> usize {
        acts.iter()
            .map(|a| match a {
                SocketAction::TcpRead { max, .. } => *max,
                _ => 0,
            })
            .sum()
    };
    // The grant made at connect time.
    let mut granted = 8000;
    h.router.handle_tcp_data(h.now, flow, &pattern(8000));
    assert_eq!(credit(h.actions()), 0, "buffer full: no credit");
    let sent: usize = h.segs().iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, 8000);
    h.send_ack(first + 2760, 512);
    assert_eq!(credit(h.actions()), 2760, "a quarter freed: granted");
    granted += 2760;
    h.send_ack(first + 8000, 512);
    granted += credit(h.actions());
    assert_eq!(granted, 8000 + 8000, "all freed space granted, never more");
}

#[test]
fn slow_host_writes_close_the_peers_window() {
    let mut config = config();
    config.tcp_buffer_size = 4096;
    let mut h = Harness::new(&config);
    let (flow, _) = h.establish();
    h.send_data(&pattern(4096), false);
    assert_eq!(writes(&h.actions()).len(), 4096);
    assert_eq!(h.segs().last().unwrap().window, 0);
    // Beyond the window: dropped, answered with the same ACK.
    h.send_data(b"more", false);
    assert!(writes(&h.actions()).is_empty());
    let ack = h.segs();
    assert_eq!(ack.last().unwrap().ack, Some(PEER_ISN + 1 + 4096));
    h.seq -= 4;
    // The host takes half: the window opens and the peer is told.
    h.router.handle_tcp_written(h.now, flow, 2048);
    let update = h.segs();
    assert_eq!(update.len(), 1);
    assert_eq!(update[0].window, 2048);
    h.send_data(b"more", false);
    assert_eq!(writes(&h.actions()), b"more");
}

/// An established connection whose peer has shut its window, with "hello"
/// from the host waiting: (flow, our first sequence number).
fn window_shut_with_data_waiting(h: &mut Harness) -> (FlowId, u32) {
    let (flow, first) = h.establish();
    h.send_ack(first, 0);
    h.router.handle_tcp_data(h.now, flow, b"hello");
    (flow, first)
}

#[test]
fn peer_zero_window_is_probed_with_backoff() {
    let mut h = Harness::new(&config());
    let (_, first) = window_shut_with_data_waiting(&mut h);
    assert!(h.segs().is_empty(), "nothing fits a zero window");
    // The handshake measured no delay: the RTO is at its 200 ms floor.
    h.advance(Duration::from_millis(199));
    assert!(h.segs().is_empty());
    h.advance(Duration::from_millis(1));
    let probe = h.segs();
    assert_eq!(probe.len(), 1, "{probe:?}");
    assert_eq!((probe[0].seq, &probe[0].payload[..]), (first, &b"h"[..]));
    // Still zero: the probe comes again, later each time (400, then 800 ms).
    h.send_ack(first, 0);
    h.advance(Duration::from_millis(399));
    assert!(h.segs().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.segs().len(), 1);
    h.send_ack(first, 0);
    h.advance(Duration::from_millis(799));
    assert!(h.segs().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.segs().len(), 1);
    // The window opens: everything goes.
    h.send_ack(first, 512);
    let segs = h.segs();
    let got: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(got, b"hello");
}

/// After a zero-window probe our next sequence number lies beyond the
/// peer's shut window. ACKs must carry the window's edge instead: the peer
/// drops a segment outside its window, ACK and all, and would retransmit
/// what we already have for as long as its window stays shut. (Found as a
/// stall under load: the peer's echo server blocked on writing to us, its
/// window shut, and its retransmissions got ACKs it could not accept.)
#[test]
fn acks_after_a_zero_window_probe_stay_inside_the_peers_window() {
    let mut h = Harness::new(&config());
    let (flow, first) = window_shut_with_data_waiting(&mut h);
    h.advance(Duration::from_millis(200));
    let probe = h.segs();
    assert_eq!((probe[0].seq, &probe[0].payload[..]), (first, &b"h"[..]));
    // The peer drops the probe (its window is still shut) and sends data.
    let old = h.seq;
    h.send_data(b"from the peer", false);
    let mut acks = h.segs();
    h.actions();
    h.router.handle_tcp_written(h.now, flow, 13);
    acks.extend(h.segs());
    assert!(
        acks.iter().any(|a| a.ack == Some(h.seq)),
        "the data is acknowledged: {acks:?}"
    );
    for ack in &acks {
        assert_eq!(ack.seq, first, "inside the shut window: {ack:?}");
    }
    // The peer missed those ACKs and retransmits: the ACK it gets back is
    // again one it can accept.
    h.send(TcpSegment {
        seq: old,
        ack: Some(first),
        window: 0,
        payload: b"from the peer",
        ..TcpSegment::default()
    });
    let again = h.segs();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!((again[0].seq, again[0].ack), (first, Some(h.seq)));
}

/// An answer a segment needs at once (here the duplicate ACK for a segment
/// beyond a gap) is made when the tunnel has room, like data, so a full
/// transmit queue cannot drop it after its window was recorded as told.
#[test]
fn owed_acks_are_not_dropped_by_a_full_transmit_queue() {
    let mut config = config();
    config.transmit_queue_capacity = 2;
    let mut h = Harness::new(&config);
    let (_, first) = h.establish();
    // Two stray segments from other ports fill the queue with their RSTs.
    for port in [1, 2] {
        let stray = TcpSegment {
            seq: 5,
            ack: Some(7),
            ..TcpSegment::default()
        };
        let from = sa(&format!("10.0.2.15:{port}"));
        let packet = packet::build_tcp(from, h.remote, &stray).unwrap();
        h.router.handle_packet(h.now, &packet);
    }
    h.send(TcpSegment {
        seq: h.seq + 100,
        ack: Some(first),
        window: 512,
        payload: b"later",
        ..TcpSegment::default()
    });
    assert_eq!(h.router.stats().dropped_queue_full, 0);
    // What reaches the tunnel: (destination, RST flag, ACK number).
    let sent: Vec<_> = std::iter::from_fn(|| h.router.poll_transmit())
        .filter_map(|p| match packet::parse(&p) {
            Ok(Parsed::Tcp { dst, segment, .. }) => Some((dst, segment.rst, segment.ack)),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent.iter().filter(|(_, rst, _)| *rst).count(),
        2,
        "{sent:?}"
    );
    assert!(sent.contains(&(h.peer, false, Some(h.seq))), "{sent:?}");
}

#[test]
fn lost_data_is_retransmitted_on_rto_with_backoff() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    h.router.handle_tcp_data(h.now, flow, b"data");
    assert_eq!(h.segs().len(), 1);
    let mut waited = Vec::new();
    let start = h.now;
    for _ in 0..3 {
        let mut step = Duration::ZERO;
        while h.segs().is_empty() {
            h.advance(Duration::from_millis(100));
            step += Duration::from_millis(100);
            assert!(step < Duration::from_secs(30));
        }
        waited.push(step);
    }
    assert!(h.now > start);
    // RTO starts at 1 s (no RTT sample yet from the handshake in zero time
    // is 200 ms floor); then doubles.
    assert_eq!(waited[1], waited[0] * 2, "{waited:?}");
    assert_eq!(waited[2], waited[1] * 2, "{waited:?}");
    h.send_ack(first + 4, 512);
    h.advance(Duration::from_secs(60));
    assert!(h.segs().is_empty());
    assert!(h.router.stats().tcp_retransmits >= 3);
}

#[test]
fn three_duplicate_acks_trigger_fast_retransmit() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    h.router.handle_tcp_data(h.now, flow, &pattern(1380 * 5));
    assert_eq!(h.segs().len(), 5);
    h.send_ack(first + 1380, 512);
    h.segs();
    for _ in 0..2 {
        h.send_ack(first + 1380, 512);
        assert!(h.segs().is_empty());
    }
    h.send_ack(first + 1380, 512);
    let resent = h.segs();
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert_eq!(resent[0].seq, first + 1380);
    assert_eq!(resent[0].payload, pattern(1380 * 5)[1380..2760]);
    assert_eq!(h.router.stats().tcp_fast_retransmits, 1);
}

#[test]
fn out_of_order_segments_are_kept_and_delivered_in_order() {
    let mut h = Harness::new(&config());
    h.establish();
    let data = pattern(3000);
    let start = h.seq;
    // Second and third segments first.
    h.seq = start + 1000;
    h.send_data(&data[1000..2000], false);
    h.send_data(&data[2000..], false);
    assert!(writes(&h.actions()).is_empty());
    let dups = h.segs();
    assert_eq!(dups.len(), 2, "a duplicate ACK each");
    assert!(dups.iter().all(|s| s.ack == Some(start)));
    h.seq = start;
    h.send_data(&data[..1000], false);
    assert_eq!(writes(&h.actions()), data);
    assert_eq!(h.segs().last().unwrap().ack, Some(start + 3000));
}

// ---- delayed ACK ---------------------------------------------------------

/// Hands the host `len` more bytes of `flow` as written, as the driver
/// reports them before it polls segments.
fn written(h: &mut Harness, flow: FlowId, len: usize) {
    h.actions();
    h.router.handle_tcp_written(h.now, flow, len);
}

/// Full segments, each written to the host before the next one comes (the
/// driver's order): every second one is acknowledged at once, the others
/// not at all, and the window's opening by the writes adds no ACK of its
/// own while the window is wide open. The same for a peer whose segments
/// are shorter than our MSS (its tunnel's MTU is 1280).
#[test]
fn every_second_full_segment_is_acked_at_once() {
    for len in [MSS, 1240] {
        let mut h = Harness::new(&config());
        let (flow, _) = h.establish();
        for i in 0..6 {
            h.send_data(&pattern(len), false);
            written(&mut h, flow, len);
            let segs = h.segs();
            if i % 2 == 0 {
                assert_eq!(segs, vec![], "{len}-byte segment {i} waits for the next");
            } else {
                assert_eq!(segs.len(), 1, "{len}-byte segment {i}: {segs:?}");
                assert_eq!(segs[0].ack, Some(h.seq));
                assert_eq!(segs[0].window, 65535);
            }
        }
        h.advance(DELAYED_ACK * 10);
        assert_eq!(h.segs(), vec![], "nothing was left waiting");
    }
}

/// A lone full segment is acknowledged when [`DELAYED_ACK`] is up, a
/// deadline that `poll_timeout` reports; nothing follows.
#[test]
fn a_lone_segment_is_acked_when_the_delay_is_up() {
    let mut h = Harness::new(&config());
    let (flow, _) = h.establish();
    let arrived = h.now;
    h.send_data(&pattern(MSS), false);
    written(&mut h, flow, MSS);
    assert_eq!(h.segs(), vec![]);
    assert_eq!(h.router.poll_timeout(), Some(arrived + DELAYED_ACK));
    h.advance(DELAYED_ACK - Duration::from_micros(1));
    assert_eq!(h.segs(), vec![]);
    h.advance(Duration::from_micros(1));
    let seg = h.one_seg();
    assert_eq!(seg.ack, Some(h.seq));
    assert!(seg.payload.is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.segs(), vec![]);
}

/// The delay counts from the first segment waiting, not the last: here a
/// peer whose full segments are 600 bytes sends two, which make less than
/// one of our full segments.
#[test]
fn the_delay_counts_from_the_first_segment_waiting() {
    let mut h = Harness::new(&config());
    let (flow, _) = h.establish();
    let first = h.now;
    h.send_data(&pattern(600), false);
    written(&mut h, flow, 600);
    h.advance(DELAYED_ACK / 2);
    h.send_data(&pattern(600), false);
    written(&mut h, flow, 600);
    assert_eq!(h.segs(), vec![]);
    assert_eq!(h.router.poll_timeout(), Some(first + DELAYED_ACK));
    h.advance(DELAYED_ACK / 2);
    let seg = h.one_seg();
    assert_eq!(seg.ack, Some(h.seq));
}

/// A short segment ends a write, and the peer may hold its next small one
/// (Nagle) until this is acknowledged: at once, and with it whatever was
/// waiting.
#[test]
fn a_short_segment_is_acked_at_once() {
    let mut h = Harness::new(&config());
    h.establish();
    h.send_data(b"GET /1 HTTP/1.1\r\n", false);
    let seg = h.one_seg();
    assert_eq!(seg.ack, Some(h.seq));
    h.send_data(&pattern(MSS), false);
    assert_eq!(h.segs(), vec![]);
    h.send_data(&pattern(100), false);
    let seg = h.one_seg();
    assert_eq!(seg.ack, Some(h.seq));
}

/// The host's answer within the delay carries the ACK: one segment, and
/// the timer finds nothing left to send.
#[test]
fn an_answer_from_the_host_carries_the_delayed_ack() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    h.send_data(&pattern(MSS), false);
    written(&mut h, flow, MSS);
    assert_eq!(h.segs(), vec![]);
    h.router.handle_tcp_data(h.now, flow, b"reply");
    let seg = h.one_seg();
    assert_eq!((seg.seq, seg.ack), (first, Some(h.seq)));
    assert_eq!(seg.payload, b"reply");
    h.advance(DELAYED_ACK * 10);
    assert_eq!(h.segs(), vec![], "no ACK of its own");
}

/// The peer's FIN is acknowledged at once, and with it the data before it
/// whose ACK was waiting.
#[test]
fn a_fin_is_acked_at_once() {
    let mut h = Harness::new(&config());
    h.establish();
    h.send_data(&pattern(MSS), false);
    assert_eq!(h.segs(), vec![]);
    h.send_data(b"", true);
    let seg = h.one_seg();
    assert_eq!(seg.ack, Some(PEER_ISN + 1 + MSS as u32 + 1));
}

/// A segment that fills only part of a hole, or repeats bytes we had, is
/// acknowledged at once, however short: the peer is recovering a loss.
#[test]
fn filling_part_of_a_hole_or_repeating_bytes_is_acked_at_once() {
    let mut h = Harness::new(&config());
    h.establish();
    let start = h.seq;
    h.seq = start + 200;
    h.send_data(&pattern(100), false);
    assert_eq!(h.segs().len(), 1, "a duplicate ACK");
    h.seq = start;
    h.send_data(&pattern(100), false);
    let seg = h.one_seg();
    assert_eq!(seg.ack, Some(start + 100));
    // Bytes 50..150: half of them repeated.
    h.seq = start + 50;
    h.send_data(&pattern(100), false);
    let seg = h.one_seg();
    assert_eq!(seg.ack, Some(start + 150));
}

#[test]
fn peer_closes_first_and_every_byte_is_written_before_shutdown() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    h.send_data(b"request", true);
    let acts = h.actions();
    assert_eq!(writes(&acts), b"request");
    assert!(
        !acts.contains(&SocketAction::TcpShutdownWrite { flow }),
        "shutdown before the bytes were written"
    );
    assert_eq!(h.segs().last().unwrap().ack, Some(PEER_ISN + 1 + 8));
    h.router.handle_tcp_written(h.now, flow, 3);
    assert!(h.actions().is_empty());
    h.router.handle_tcp_written(h.now, flow, 4);
    assert_eq!(h.actions(), vec![SocketAction::TcpShutdownWrite { flow }]);
    // The host answers and closes; the answer, then the FIN.
    h.router.handle_tcp_data(h.now, flow, b"response");
    h.router.handle_tcp_eof(h.now, flow);
    let segs = h.segs();
    let got: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(got, b"response");
    assert!(segs.last().unwrap().fin);
    assert!(h.actions().is_empty());
    h.send_ack(first + 8 + 1, 512);
    assert_eq!(h.actions(), vec![SocketAction::TcpClose { flow }]);
    assert_eq!(
        h.router.poll_timeout(),
        None,
        "no TIME-WAIT for the passive closer"
    );
    assert_eq!(h.router.stats().tcp_closed, 1);
}

#[test]
fn host_closes_first_and_the_peer_keeps_sending() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    h.router.handle_tcp_data(h.now, flow, b"greeting");
    h.router.handle_tcp_eof(h.now, flow);
    let segs = h.segs();
    assert_eq!(segs.len(), 1);
    assert!(segs[0].fin && segs[0].payload == b"greeting");
    // The FIN is retransmitted like data.
    h.advance(Duration::from_secs(2));
    let again = h.segs();
    assert!(again.iter().any(|s| s.fin && s.payload == b"greeting"));
    h.send_ack(first + 9, 512);
    // The peer goes on sending after our FIN.
    let body = pattern(3000);
    h.send_data(&body, false);
    h.send_data(b"", true);
    let acts = h.actions();
    assert_eq!(writes(&acts), body);
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, SocketAction::TcpShutdownWrite { .. }))
    );
    h.router.handle_tcp_written(h.now, flow, 3000);
    assert_eq!(
        h.actions(),
        vec![
            SocketAction::TcpShutdownWrite { flow },
            SocketAction::TcpClose { flow }
        ]
    );
    // TIME-WAIT: a retransmitted FIN is acknowledged again, without a socket.
    h.segs();
    h.seq -= 1;
    h.send_data(b"", true);
    let ack = h.segs();
    assert_eq!(ack.len(), 1);
    assert_eq!(ack[0].ack, Some(h.seq));
    assert!(h.actions().is_empty());
    h.advance(Duration::from_secs(3));
    assert_eq!(h.router.poll_timeout(), None, "TIME-WAIT over");
}

/// The e2e failure of `half_close_server_first_every_byte_arrives`, step by
/// step: the host closes first, the peer's last bytes and FIN arrive while
/// the host socket still has them to write, and our ACK of that FIN closes
/// the peer's socket (LAST-ACK to CLOSED). Any later segment of ours makes
/// the peer's kernel answer with a RST; that RST must not discard the bytes
/// we acknowledged (it used to become `TcpAbort`, SO_LINGER 0, and the host
/// lost the tail of the upload).
#[test]
fn host_closes_first_and_a_rst_after_both_fins_loses_no_byte() {
    let mut config = config();
    config.tcp_buffer_size = 8192;
    let mut h = Harness::new(&config);
    let (flow, first) = h.establish();
    h.router.handle_tcp_data(h.now, flow, b"greeting");
    h.router.handle_tcp_eof(h.now, flow);
    assert!(h.segs().last().unwrap().fin);
    h.send_ack(first + 9, 512);
    let body = pattern(6000);
    h.send_data(&body, true);
    let acts = h.actions();
    assert_eq!(writes(&acts), body);
    assert!(
        !acts.contains(&SocketAction::TcpShutdownWrite { flow }),
        "shutdown before the bytes were written"
    );
    let ack = h.segs();
    assert_eq!(
        ack.last().unwrap().ack,
        Some(h.seq),
        "the FIN is acknowledged"
    );
    // The host takes the bytes bit by bit: no window update goes to a peer
    // that has sent its FIN (it would be a stray segment to a closed socket).
    h.router.handle_tcp_written(h.now, flow, 3000);
    assert!(h.actions().is_empty());
    assert_eq!(h.segs(), vec![], "nothing after the ACK of the peer's FIN");
    // The peer's kernel resets anyway (say, a duplicate of that ACK): the
    // rest is still written, then the socket shut down and closed in order.
    h.send(TcpSegment {
        seq: h.seq,
        rst: true,
        ..TcpSegment::default()
    });
    assert!(
        !h.actions()
            .iter()
            .any(|a| matches!(a, SocketAction::TcpAbort { .. })),
        "the acknowledged bytes were thrown away"
    );
    h.router.handle_tcp_written(h.now, flow, 3000);
    assert_eq!(
        h.actions(),
        vec![
            SocketAction::TcpShutdownWrite { flow },
            SocketAction::TcpClose { flow }
        ]
    );
    assert_eq!(h.segs(), vec![], "nothing more for a peer that is gone");
    assert_eq!(h.router.stats().tcp_closed, 1);
    h.advance(Duration::from_secs(3));
    assert_eq!(h.router.poll_timeout(), None);
}

#[test]
fn rst_is_relayed_both_ways() {
    let mut h = Harness::new(&config());
    let (flow, first) = h.establish();
    h.send(TcpSegment {
        seq: h.seq,
        rst: true,
        ..TcpSegment::default()
    });
    assert_eq!(h.actions(), vec![SocketAction::TcpAbort { flow }]);

    let mut h = Harness::new(&config());
    let (flow, first2) = h.establish();
    h.router.handle_tcp_error(h.now, flow);
    let segs = h.segs();
    assert_eq!(segs.len(), 1);
    assert!(segs[0].rst);
    assert_eq!(segs[0].seq, first2);
    assert!(
        h.actions().is_empty(),
        "the driver dropped the socket itself"
    );
    let _ = first;
}

#[test]
fn rst_out_of_window_is_ignored_and_in_window_gets_a_challenge_ack() {
    let mut h = Harness::new(&config());
    let (_, _) = h.establish();
    h.send(TcpSegment {
        seq: h.seq + 100,
        rst: true,
        ..TcpSegment::default()
    });
    assert!(h.actions().is_empty());
    let challenge = h.segs();
    assert_eq!(challenge.len(), 1);
    assert!(!challenge[0].rst);
    h.send(TcpSegment {
        seq: h.seq.wrapping_sub(1_000_000),
        rst: true,
        ..TcpSegment::default()
    });
    assert!(h.actions().is_empty());
    assert!(h.segs().is_empty());
}

#[test]
fn connection_cap_refuses_with_rst_and_evicts_nothing() {
    let mut config = config();
    config.max_tcp_connections = 1;
    let mut h = Harness::new(&config);
    h.establish();
    let other = TcpSegment {
        seq: 5,
        syn: true,
        window: 1000,
        ..TcpSegment::default()
    };
    let packet = packet::build_tcp(sa("10.0.2.15:40001"), sa(REMOTE), &other).unwrap();
    h.router.handle_packet(h.now, &packet);
    assert!(h.actions().is_empty());
    let out = std::iter::from_fn(|| h.router.poll_transmit()).collect::<Vec<_>>();
    let Ok(Parsed::Tcp { segment, .. }) = packet::parse(&out[0]) else {
        panic!("no RST");
    };
    assert!(segment.rst && segment.ack == Some(6));
    assert_eq!(h.router.stats().tcp_refused_limit, 1);
    // The first connection still works.
    h.send_data(b"still here", false);
    assert_eq!(writes(&h.actions()), b"still here");
}

/// The SYN cache: at the pending-connect cap the peer's oldest connect
/// goes (its socket closed, nothing to the peer) and the new SYN proceeds.
#[test]
fn pending_connect_cap_evicts_the_oldest_connect() {
    let mut config = config();
    config.max_tcp_pending_connects = 2;
    let mut h = Harness::new(&config);
    let syn_from = |h: &mut Harness, port: u16| {
        let syn = TcpSegment {
            seq: 5,
            syn: true,
            window: 1000,
            ..TcpSegment::default()
        };
        let from = SocketAddr::new(h.peer.ip(), port);
        let packet = packet::build_tcp(from, sa(REMOTE), &syn).unwrap();
        h.router.handle_packet(h.now, &packet);
        match h.actions()[..] {
            [SocketAction::TcpConnect { flow, .. }] => (flow, None),
            [
                SocketAction::TcpClose { flow: evicted },
                SocketAction::TcpConnect { flow, .. },
            ] => (flow, Some(evicted)),
            ref other => panic!("unexpected {other:?}"),
        }
    };
    let (first, _) = syn_from(&mut h, 40001);
    h.advance(Duration::from_secs(1));
    let (second, _) = syn_from(&mut h, 40002);
    let (third, evicted) = syn_from(&mut h, 40003);
    assert_eq!(evicted, Some(first));
    assert!(!h.router.has_transmit(), "nothing goes to the peer");
    assert_eq!(h.router.stats().tcp_pending_evicted, 1);
    assert_eq!(h.router.stats().tcp_refused_limit, 0);
    assert_eq!(h.router.occupancy().tcp_pending_connects, 2);
    // A late result for the abandoned connect finds nothing.
    h.router.handle_tcp_connected(h.now, first);
    assert!(!h.router.has_transmit());
    // The newest connect completes: SYN-ACK to the peer.
    h.router.handle_tcp_connected(h.now, third);
    assert_eq!(
        h.actions(),
        vec![SocketAction::TcpRead {
            flow: third,
            max: 65535
        }]
    );
    let out: Vec<_> = std::iter::from_fn(|| h.router.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    let Ok(Parsed::Tcp { dst, segment, .. }) = packet::parse(&out[0]) else {
        panic!("no SYN-ACK");
    };
    assert!(segment.syn && segment.ack == Some(6) && dst.port() == 40003);
    // With the slot it freed, the next SYN evicts nothing.
    let (_, evicted) = syn_from(&mut h, 40004);
    assert_eq!(evicted, None);
    let (_, evicted) = syn_from(&mut h, 40005);
    assert_eq!(evicted, Some(second));
}

#[test]
fn idle_connection_is_reset_both_ways() {
    let mut config = config();
    config.tcp_idle_timeout = Duration::from_secs(100);
    let mut h = Harness::new(&config);
    let (flow, _) = h.establish();
    h.advance(Duration::from_secs(50));
    h.send_data(b"x", false);
    h.actions();
    h.segs();
    h.advance(Duration::from_secs(99));
    assert!(h.actions().is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.actions(), vec![SocketAction::TcpAbort { flow }]);
    assert!(h.segs().iter().any(|s| s.rst));
    assert_eq!(h.router.stats().tcp_idle_closed, 1);
    assert_eq!(h.router.poll_timeout(), None);
}

#[test]
fn window_scaling_is_offered_and_honoured() {
    let mut config = config();
    config.tcp_buffer_size = 1 << 20;
    let mut h = Harness::new(&config);
    let (flow, _) = h.establish();
    // Our 1 MiB window, scaled by 5 (1 MiB >> 5 fits 16 bits).
    h.send_data(b"x", false);
    h.actions();
    let ack = h.segs().pop().unwrap();
    assert_eq!(u32::from(ack.window) << 5, (1 << 20) - 32);
    // The peer's window field 10, scaled by its 7: 1280 bytes, not 10.
    h.send_ack(h.ack, 10);
    h.router.handle_tcp_data(h.now, flow, &pattern(100_000));
    let sent: usize = h.segs().iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, 1280);
}

#[test]
fn lazy_segments_wait_for_poll_transmit_round_robin() {
    let mut h = Harness::new(&config());
    let (a, _) = h.establish();
    let mut h2_peer = TcpSegment {
        seq: 9000,
        syn: true,
        mss: Some(1460),
        window: 65535,
        ..TcpSegment::default()
    };
    let peer2 = sa("10.0.2.15:40002");
    h.router.handle_packet(
        h.now,
        &packet::build_tcp(peer2, sa(REMOTE), &h2_peer).unwrap(),
    );
    let [SocketAction::TcpConnect { flow: b, .. }] = h.actions()[..] else {
        panic!("no connect");
    };
    h.router.handle_tcp_connected(h.now, b);
    let syn_ack = std::iter::from_fn(|| h.router.poll_transmit()).collect::<Vec<_>>();
    let Ok(Parsed::Tcp { segment, .. }) = packet::parse(&syn_ack[0]) else {
        panic!();
    };
    h2_peer.syn = false;
    h2_peer.mss = None;
    h2_peer.seq = 9001;
    h2_peer.ack = Some(segment.seq.wrapping_add(1));
    h.router.handle_packet(
        h.now,
        &packet::build_tcp(peer2, sa(REMOTE), &h2_peer).unwrap(),
    );
    h.actions();
    h.router.handle_tcp_data(h.now, a, &pattern(4000));
    h.router.handle_tcp_data(h.now, b, &pattern(4000));
    assert!(h.router.has_transmit());
    let dests: Vec<u16> = std::iter::from_fn(|| h.router.poll_transmit())
        .map(|p| match packet::parse(&p) {
            Ok(Parsed::Tcp { dst, .. }) => dst.port(),
            _ => 0,
        })
        .collect();
    assert_eq!(dests, vec![40000, 40002, 40000, 40002, 40000, 40002]);
    assert!(!h.router.has_transmit());
}

mod proptests {
    //! Random loss, reordering and duplication of a peer's stream (and
    //! random junk segments) never panic the router, and the host side
    //! receives a prefix of the stream, in order.
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// Send segment `i` of the stream (maybe again, maybe early).
        Segment(usize),
        /// A random segment on the same connection.
        Junk {
            seq_off: u32,
            ack_off: u32,
            flags: u8,
            window: u16,
            len: usize,
        },
        /// The host takes `n` bytes.
        Written(usize),
        /// The host sends `n` bytes.
        HostData(usize),
        /// Time passes.
        Wait(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0usize..12).prop_map(Step::Segment),
            2 => (any::<u32>(), any::<u32>(), any::<u8>(), any::<u16>(), 0usize..100).prop_map(
                |(seq_off, ack_off, flags, window, len)| Step::Junk { seq_off, ack_off, flags, window, len }
            ),
            2 => (0usize..5000).prop_map(Step::Written),
            1 => (0usize..3000).prop_map(Step::HostData),
            1 => (0u64..3000).prop_map(Step::Wait),
        ]
    }

    /// What the peer does next with the host's stream.
    #[derive(Debug, Clone)]
    enum PeerStep {
        /// The host sends `n` bytes (within the credit granted).
        HostData(usize),
        /// The peer acknowledges what it holds in order, with `window`
        /// (scaled by 7; 0 shuts it).
        Ack(u16),
        /// The next `n` segments are lost.
        Lose(usize),
        /// The next segment is delivered twice.
        Duplicate,
        /// The segments in flight arrive in reverse order.
        Reorder,
        /// Time passes.
        Wait(u64),
    }

    fn peer_step() -> impl Strategy<Value = PeerStep> {
        prop_oneof![
            3 => (1usize..6000).prop_map(PeerStep::HostData),
            3 => prop_oneof![4 => Just(512u16), 1 => Just(0u16), 1 => 1u16..64].prop_map(PeerStep::Ack),
            1 => (1usize..4).prop_map(PeerStep::Lose),
            1 => Just(PeerStep::Duplicate),
            1 => Just(PeerStep::Reorder),
            2 => (0u64..3000).prop_map(PeerStep::Wait),
        ]
    }

    /// The peer's receiving side: the bytes it holds in order, and the
    /// segments that arrived ahead of them.
    #[derive(Default)]
    struct Receiver {
        held: Vec<u8>,
        ahead: std::collections::BTreeMap<u32, Vec<u8>>,
    }

    impl Receiver {
        /// Takes `seg` (`first` is the stream's first sequence number).
        fn take(&mut self, first: u32, seg: &Seg) {
            self.ahead
                .insert(seg.seq.wrapping_sub(first), seg.payload.clone());
            while let Some((&offset, _)) = self.ahead.first_key_value() {
                let offset = offset as usize;
                if offset > self.held.len() {
                    break;
                }
                let (_, payload) = self.ahead.pop_first().unwrap();
                let skip = self.held.len() - offset;
                if skip < payload.len() {
                    self.held.extend_from_slice(&payload[skip..]);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn streams_arrive_in_order_whatever_the_peer_does(steps in proptest::collection::vec(step(), 1..80)) {
            let mut config = config();
            config.tcp_buffer_size = 8192;
            let mut h = Harness::new(&config);
            let (flow, first) = h.establish();
            let stream = pattern(12 * 700);
            let base = h.seq;
            let mut delivered = Vec::new();
            let mut unwritten = 0usize;
            for step in steps {
                match step {
                    Step::Segment(i) => {
                        let seg = TcpSegment {
                            seq: base + (i * 700) as u32,
                            ack: Some(first),
                            window: 512,
                            fin: i == 11,
                            payload: &stream[i * 700..(i + 1) * 700],
                            ..TcpSegment::default()
                        };
                        h.send(seg);
                    }
                    Step::Junk { seq_off, ack_off, flags, window, len } => {
                        let payload = vec![0xee; len];
                        let seg = TcpSegment {
                            seq: base.wrapping_add(seq_off),
                            ack: (flags & 1 != 0).then_some(first.wrapping_add(ack_off)),
                            syn: flags & 2 != 0,
                            fin: flags & 4 != 0 && flags & 2 == 0,
                            rst: flags & 8 != 0 && flags & 6 == 0 && seq_off % 4 != 0,
                            window,
                            payload: &payload,
                            ..TcpSegment::default()
                        };
                        // Junk must not be in-window data, or it would
                        // legitimately be delivered.
                        if seg.rst || seg.syn || len == 0 || seq_off >= 1 << 30 {
                            h.send(seg);
                        }
                    }
                    Step::Written(n) => {
                        let n = n.min(unwritten);
                        unwritten -= n;
                        h.router.handle_tcp_written(h.now, flow, n);
                    }
                    Step::HostData(n) => h.router.handle_tcp_data(h.now, flow, &pattern(n)),
                    Step::Wait(ms) => h.advance(Duration::from_millis(ms)),
                }
                for action in h.actions() {
                    if let SocketAction::TcpWrite { data, .. } = action {
                        unwritten += data.len();
                        delivered.extend_from_slice(&data);
                    }
                }
                h.out();
                prop_assert!(unwritten <= 8192, "more unwritten than the buffer");
                prop_assert_eq!(&delivered[..], &stream[..delivered.len()]);
            }
        }

        #[test]
        fn host_streams_reach_the_peer_intact_through_loss_and_reordering(
            steps in proptest::collection::vec(peer_step(), 1..60)
        ) {
            let mut config = config();
            config.tcp_buffer_size = 8192;
            let mut h = Harness::new(&config);
            let (flow, first) = h.establish();
            let stream = pattern(200_000);
            // The grant made at connect time.
            let mut credit = 8192usize;
            let mut fed = 0usize;
            let mut peer = Receiver::default();
            let (mut lose, mut duplicate) = (0usize, false);
            let deliver = |h: &mut Harness, peer: &mut Receiver, lose: &mut usize,
                               duplicate: &mut bool, reorder: bool| {
                let mut segs = h.segs();
                if reorder {
                    segs.reverse();
                }
                for seg in segs {
                    prop_assert!(!seg.rst && !seg.syn, "unexpected {:?}", seg);
                    if *lose > 0 {
                        *lose -= 1;
                        continue;
                    }
                    peer.take(first, &seg);
                    if std::mem::take(duplicate) {
                        peer.take(first, &seg);
                    }
                }
                prop_assert_eq!(&peer.held[..], &stream[..peer.held.len()]);
                Ok(())
            };
            for step in steps {
                let mut reorder = false;
                match step {
                    PeerStep::HostData(n) => {
                        let n = n.min(credit).min(stream.len() - fed);
                        credit -= n;
                        h.router.handle_tcp_data(h.now, flow, &stream[fed..fed + n]);
                        fed += n;
                    }
                    PeerStep::Ack(window) => {
                        h.send_ack(first.wrapping_add(peer.held.len() as u32), window);
                    }
                    PeerStep::Lose(n) => lose += n,
                    PeerStep::Duplicate => duplicate = true,
                    PeerStep::Reorder => reorder = true,
                    PeerStep::Wait(ms) => h.advance(Duration::from_millis(ms)),
                }
                for action in h.actions() {
                    if let SocketAction::TcpRead { max, .. } = action {
                        credit += max;
                    }
                }
                prop_assert!(credit <= 8192, "more credit than the buffer");
                deliver(&mut h, &mut peer, &mut lose, &mut duplicate, reorder)?;
            }
            // Then the path heals: everything fed arrives, by retransmission
            // where it was lost.
            lose = 0;
            for _ in 0..200 {
                if peer.held.len() == fed {
                    break;
                }
                h.send_ack(first.wrapping_add(peer.held.len() as u32), 512);
                h.advance(Duration::from_millis(500));
                deliver(&mut h, &mut peer, &mut lose, &mut duplicate, false)?;
            }
            prop_assert_eq!(peer.held.len(), fed, "not every byte arrived");
        }
    }
}

#[test]
fn denied_destination_gets_rst_and_no_connect() {
    let mut h = Harness::with_addrs(&config(), sa(PEER), sa("127.0.0.1:22"));
    h.syn(None);
    assert!(h.actions().is_empty());
    let segs = h.segs();
    assert_eq!(segs.len(), 1);
    assert!(segs[0].rst && segs[0].ack == Some(PEER_ISN + 1));
    assert_eq!(h.router.stats().dropped_policy, 1);
}

#[test]
fn host_address_connects_to_the_hosts_loopback() {
    let mut config = config();
    config.host_address = Some("10.0.2.2".parse().unwrap());
    let mut h = Harness::with_addrs(&config, sa(PEER), sa("10.0.2.2:8080"));
    h.syn(None);
    let [SocketAction::TcpConnect { flow, dest }] = h.actions()[..] else {
        panic!("no connect");
    };
    assert_eq!(dest, sa("127.0.0.1:8080"));
    h.router.handle_tcp_connected(h.now, flow);
    // The peer talks to the address it chose.
    let syn_ack = h.segs().pop().expect("SYN-ACK");
    assert!(syn_ack.syn);
}

// ---- reverse forwards (`-t`): active open toward the peer -------------------

/// DEST inside the tunnel, and the forward's SOURCE.
const DEST: &str = "10.0.2.15:80";
const SOURCE: &str = "10.0.2.1:5000";
/// A host-side client.
const CLIENT: &str = "192.0.2.9:4000";

fn forward_config(forwards: &[&str]) -> Config {
    let mut config = config();
    config.incoming_tcp = forwards.iter().map(|f| f.parse().unwrap()).collect();
    config
}

/// A harness whose "peer" is DEST and "remote" the tunnel-side source.
fn reverse_harness(config: &Config, source: &str) -> Harness {
    Harness::with_addrs(config, sa(DEST), sa(source))
}

impl Harness {
    /// Accepts `client` on forward `forward` and returns the flow and our
    /// SYN.
    fn accept(&mut self, forward: usize, client: &str) -> (FlowId, Seg) {
        let flow = self
            .router
            .handle_tcp_accepted(self.now, forward, sa(client))
            .expect("accepted");
        assert!(self.actions().is_empty(), "nothing read before the SYN-ACK");
        let segs = self.segs();
        let [syn] = &segs[..] else {
            panic!("{segs:?}");
        };
        assert!(syn.syn && syn.ack.is_none() && !syn.rst, "{syn:?}");
        (flow, syn.clone())
    }

    /// The peer's SYN-ACK for `syn`.
    fn syn_ack(&mut self, syn: &Seg, wscale: Option<u8>) {
        self.send(TcpSegment {
            seq: PEER_ISN,
            ack: Some(syn.seq.wrapping_add(1)),
            syn: true,
            window: 64240,
            wscale,
            mss: Some(1460),
            ..TcpSegment::default()
        });
        self.seq = PEER_ISN + 1;
        self.ack = syn.seq.wrapping_add(1);
    }
}

/// Every packet for the peer: (source, destination, SYN, RST).
fn sent_tcp(router: &mut Router) -> Vec<(SocketAddr, SocketAddr, bool, bool)> {
    std::iter::from_fn(|| router.poll_transmit())
        .map(|p| match packet::parse(&p) {
            Ok(Parsed::Tcp { src, dst, segment }) => (src, dst, segment.syn, segment.rst),
            other => panic!("not TCP: {other:?}"),
        })
        .collect()
}

#[test]
fn active_open_completes_and_grants_credit_only_then() {
    let config = forward_config(&[&format!("0.0.0.0:8080,{SOURCE},{DEST}")]);
    let mut h = reverse_harness(&config, SOURCE);
    let (flow, syn) = h.accept(0, CLIENT);
    assert_eq!(syn.mss, Some(1420 - 40));
    assert_eq!(syn.wscale, Some(0), "offered, 65535-byte buffer");
    assert_eq!(syn.window, 65535);
    h.syn_ack(&syn, Some(7));
    assert_eq!(
        h.actions(),
        vec![SocketAction::TcpRead { flow, max: 65535 }]
    );
    let segs = h.segs();
    let [ack] = &segs[..] else {
        panic!("{segs:?}");
    };
    assert!(!ack.syn && !ack.rst);
    assert_eq!(ack.seq, syn.seq.wrapping_add(1));
    assert_eq!(ack.ack, Some(PEER_ISN + 1));
    let stats = h.router.stats();
    assert_eq!((stats.tcp_forward_accepted, stats.tcp_established), (1, 1));
}

#[test]
fn active_open_relays_data_both_ways_and_closes() {
    let config = forward_config(&[&format!("0.0.0.0:8080,{SOURCE},{DEST}")]);
    let mut h = reverse_harness(&config, SOURCE);
    let (flow, syn) = h.accept(0, CLIENT);
    h.syn_ack(&syn, Some(7));
    h.actions();
    h.segs();
    let first = syn.seq.wrapping_add(1);

    // Host to peer, in segments of our MSS (below the peer's 1460).
    let data = pattern(5000);
    h.router.handle_tcp_data(h.now, flow, &data);
    let segs = h.segs();
    let got: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(got, data);
    assert!(segs.iter().all(|s| s.payload.len() <= 1380));
    h.window = 512; // scaled by 7
    h.send_ack(first.wrapping_add(5000), 512);

    // Peer to host.
    let reply = pattern(3000);
    h.send_data(&reply, false);
    assert_eq!(writes(&h.actions()), reply);
    h.router.handle_tcp_written(h.now, flow, reply.len());
    h.actions();
    h.segs();

    // The host closes first; then the peer.
    h.router.handle_tcp_eof(h.now, flow);
    let fin = h.segs().pop().expect("FIN");
    assert!(fin.fin && fin.seq == first.wrapping_add(5000));
    h.send_ack(first.wrapping_add(5001), 512);
    h.send_data(b"", true);
    let acts = h.actions();
    assert!(
        acts.contains(&SocketAction::TcpShutdownWrite { flow })
            && acts.contains(&SocketAction::TcpClose { flow }),
        "{acts:?}"
    );
}

#[test]
fn dest_refusing_aborts_the_host_socket() {
    let config = forward_config(&[&format!("0.0.0.0:8080,,{DEST}")]);
    let mut h = reverse_harness(&config, CLIENT);
    let (flow, syn) = h.accept(0, CLIENT);
    // A RST that does not acknowledge our SYN is ignored...
    h.send(TcpSegment {
        seq: 0,
        rst: true,
        ..TcpSegment::default()
    });
    assert!(h.actions().is_empty());
    // ...one that does means refused.
    h.send(TcpSegment {
        seq: 0,
        ack: Some(syn.seq.wrapping_add(1)),
        rst: true,
        ..TcpSegment::default()
    });
    assert_eq!(h.actions(), vec![SocketAction::TcpAbort { flow }]);
    assert!(h.segs().is_empty());
    assert_eq!(h.router.stats().tcp_forward_refused, 1);
    assert_eq!(h.router.poll_timeout(), None, "flow gone");
}

#[test]
fn syn_ack_for_another_syn_gets_rst_and_the_open_goes_on() {
    let config = forward_config(&[&format!("0.0.0.0:8080,{SOURCE},{DEST}")]);
    let mut h = reverse_harness(&config, SOURCE);
    let (flow, syn) = h.accept(0, CLIENT);
    h.send(TcpSegment {
        seq: 77,
        ack: Some(syn.seq.wrapping_add(9)),
        syn: true,
        window: 1000,
        ..TcpSegment::default()
    });
    let segs = h.segs();
    assert_eq!(
        segs,
        vec![Seg {
            seq: syn.seq.wrapping_add(9),
            rst: true,
            ..Seg::default()
        }]
    );
    h.syn_ack(&syn, None);
    assert_eq!(
        h.actions(),
        vec![SocketAction::TcpRead { flow, max: 65535 }]
    );
}

#[test]
fn syn_is_retransmitted_with_backoff_then_times_out() {
    let mut config = forward_config(&[&format!("0.0.0.0:8080,{SOURCE},{DEST}")]);
    config.tcp_connect_timeout = Duration::from_secs(10);
    let mut h = reverse_harness(&config, SOURCE);
    let (flow, syn) = h.accept(0, CLIENT);
    let mut sent_at = vec![Duration::ZERO];
    let start = h.now;
    for _ in 0..100 {
        h.advance(Duration::from_millis(100));
        for again in h.segs() {
            assert_eq!(again, syn, "the same SYN");
            sent_at.push(h.now - start);
        }
        if !h.actions().is_empty() {
            break;
        }
    }
    let secs: Vec<u64> = sent_at.iter().map(|d| d.as_millis() as u64 / 100).collect();
    assert_eq!(secs, vec![0, 10, 30, 70], "1, 2, 4 s apart (in 100 ms)");
    assert_eq!(h.now - start, Duration::from_secs(10));
    let _ = flow;
    assert_eq!(h.router.stats().tcp_forward_timeouts, 1);
    assert_eq!(h.router.poll_timeout(), None, "flow gone");
    // A late SYN-ACK is a stray segment: RST from its ACK.
    h.syn_ack(&syn, None);
    let segs = h.segs();
    assert!(segs.len() == 1 && segs[0].rst, "{segs:?}");
}

#[test]
fn no_answer_aborts_the_host_socket_at_the_connect_timeout() {
    let mut config = forward_config(&[&format!("0.0.0.0:8080,{SOURCE},{DEST}")]);
    config.tcp_connect_timeout = Duration::from_secs(3);
    let mut h = reverse_harness(&config, SOURCE);
    let (flow, _) = h.accept(0, CLIENT);
    h.advance(Duration::from_millis(2999));
    assert!(h.actions().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.actions(), vec![SocketAction::TcpAbort { flow }]);
}

#[test]
fn source_port_0_goes_round_robin_and_skips_busy_ports() {
    let config = forward_config(&[
        &format!("0.0.0.0:8080,10.0.2.1:49153,{DEST}"),
        &format!("0.0.0.0:8081,10.0.2.1:0,{DEST}"),
    ]);
    let mut router = Router::with_secret(&config, [7; 16]);
    let now = Instant::now();
    let mut open = |forward: usize, client: &str| {
        router
            .handle_tcp_accepted(now, forward, sa(client))
            .expect("accepted");
        let sent = sent_tcp(&mut router);
        let [(src, dst, true, false)] = sent[..] else {
            panic!("{sent:?}");
        };
        assert_eq!(dst, sa(DEST));
        src.port()
    };
    // Forward 0's fixed SOURCE takes 49153.
    assert_eq!(open(0, "192.0.2.1:1"), 49153);
    let ports: Vec<u16> = (2..5).map(|i| open(1, &format!("192.0.2.1:{i}"))).collect();
    assert_eq!(ports, vec![49152, 49154, 49155], "49153 is busy");
    // SOURCE's own port, while in use, is not shared either.
    assert_eq!(open(0, "192.0.2.1:9"), 49156);
}

#[test]
fn without_source_the_clients_address_is_used_unless_taken() {
    let config = forward_config(&[&format!("0.0.0.0:8080,,{DEST}")]);
    let mut router = Router::with_secret(&config, [7; 16]);
    let now = Instant::now();
    let mut sources = Vec::new();
    for _ in 0..2 {
        router
            .handle_tcp_accepted(now, 0, sa("[::ffff:192.0.2.9]:4000"))
            .expect("accepted");
        let sent = sent_tcp(&mut router);
        sources.push(sent[0].0);
    }
    // The same client address twice (two gateways' clients behind one
    // NAT, say): the second gets another port of the same address.
    assert_eq!(sources[0], sa(CLIENT));
    assert_eq!(sources[1], sa("192.0.2.9:49152"));
}

#[test]
fn unusable_forwards_and_the_connection_cap_refuse() {
    let mut config =
        forward_config(&[&format!("0.0.0.0:8080,,{DEST}"), "[::]:8081,,[fd00::15]:80"]);
    config.max_tcp_connections = 1;
    let mut router = Router::with_secret(&config, [7; 16]);
    let now = Instant::now();
    // An IPv4 client, DEST IPv6, no SOURCE: no address to send from.
    assert_eq!(router.handle_tcp_accepted(now, 1, sa(CLIENT)), None);
    // No such forward.
    assert_eq!(router.handle_tcp_accepted(now, 9, sa(CLIENT)), None);
    assert_eq!(router.stats().tcp_forward_dropped, 2);
    assert!(router.handle_tcp_accepted(now, 0, sa(CLIENT)).is_some());
    assert_eq!(router.handle_tcp_accepted(now, 0, sa("192.0.2.10:1")), None);
    assert_eq!(router.stats().tcp_refused_limit, 1);
}

#[test]
fn ipv6_active_open() {
    let config = forward_config(&["[::]:8080,[fd00::1]:0,[fd00::15]:80"]);
    let mut h = Harness::with_addrs(&config, sa("[fd00::15]:80"), sa("[fd00::1]:49152"));
    let (flow, syn) = h.accept(0, "[2001:db8::7]:4000");
    assert_eq!(syn.mss, Some(1420 - 60));
    h.syn_ack(&syn, Some(7));
    assert_eq!(
        h.actions(),
        vec![SocketAction::TcpRead { flow, max: 65535 }]
    );
}
