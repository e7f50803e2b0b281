//! The WireGuard socket, sending runs of datagrams with UDP GSO.
//!
//! gotatun sends a batch of encrypted packets with one `sendmmsg`, but the
//! kernel still walks its UDP/IP stack once per datagram (and, when the
//! peer is on this host, the receiving side's too, in our time). With
//! generic segmentation offload (`UDP_SEGMENT`, Linux 4.18) a run of
//! datagrams to one address, all of one size but the last, goes down as one
//! send that the kernel cuts into datagrams as late as it can. A bulk
//! transfer toward a peer is exactly that: full segments, all padded to the
//! same length. The run goes down as it lies, one `iovec` per datagram:
//! the kernel reads the segments from the vector, so nothing is copied
//! first.
//!
//! A single datagram, and everything once the kernel has refused GSO (an
//! old kernel, or a device without checksum offload answers EIO), go out
//! the way gotatun sends them. Receiving is gotatun's (recvmmsg and GRO).

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gotatun::packet::{Packet, PacketBufPool};
use gotatun::udp::socket::UdpSocket;
use gotatun::udp::{UdpRecv, UdpSend};
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};

/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 on
/// older kernels, 128 on newer ones).
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send: the payload of one UDP datagram.
const MAX_RUN_BYTES: usize = 65_000;

/// gotatun's UDP socket, with GSO for runs of equal-sized datagrams.
#[derive(Clone)]
pub(super) struct GsoSocket {
    inner: UdpSocket,
    /// Cleared for good when the kernel refuses a GSO send.
    gso: Arc<AtomicBool>,
}

impl GsoSocket {
    pub(super) fn new(inner: UdpSocket) -> Self {
        GsoSocket {
            inner,
            gso: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Sends `run` (one destination; every datagram the first one's size,
    /// the last no larger) as one GSO send.
    async fn send_run(&self, run: &[(Packet, SocketAddr)]) -> io::Result<()> {
        let (first, dest) = &run[0];
        let segment =
            u16::try_from(first.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS];
        for (slot, (packet, _)) in iov.iter_mut().zip(run) {
            *slot = IoSlice::new(packet);
        }
        let iov = &iov[..run.len()];
        let dest = SockaddrStorage::from(*dest);
        self.inner
            .send_io(|socket| {
                let cmsgs = [ControlMessage::UdpGsoSegments(&segment)];
                let fd = socket.as_raw_fd();
                sendmsg(fd, iov, &cmsgs, MsgFlags::MSG_DONTWAIT, Some(&dest))
                    .map_err(io::Error::from)
            })
            .await
            .map(drop)
    }
}

/// Where a run that starts at `packets[start]` ends (exclusive): the same
/// destination, every datagram the first one's size except a shorter last
/// one, within [`MAX_SEGMENTS`] and [`MAX_RUN_BYTES`].
fn run_end(packets: &[(Packet, SocketAddr)], start: usize) -> usize {
    let (first, dest) = &packets[start];
    let segment = first.len();
    let mut bytes = segment;
    let mut end = start + 1;
    while end < packets.len() && end - start < MAX_SEGMENTS {
        let (packet, to) = &packets[end];
        if to != dest || packet.len() > segment || bytes + packet.len() > MAX_RUN_BYTES {
            break;
        }
        bytes += packet.len();
        end += 1;
        if packet.len() < segment {
            break;
        }
    }
    end
}

/// Whether a failed GSO send means the kernel or the device cannot do GSO.
fn gso_refused(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Reused buffers for [`GsoSocket::send_many_to`]: gotatun's, for sending
/// without GSO.
#[derive(Default)]
pub(super) struct SendBuf {
    fallback: <UdpSocket as UdpSend>::SendManyBuf,
}

impl UdpSend for GsoSocket {
    type SendManyBuf = SendBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.inner.send_to(packet, destination).await
    }

    async fn send_many_to(
        &self,
        buf: &mut SendBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        let mut start = 0;
        while start < packets.len() && self.gso.load(Ordering::Relaxed) {
            let end = run_end(packets, start);
            if end - start == 1 {
                let (packet, dest) = &packets[start];
                self.inner
                    .send_io(|socket| socket.send_to(&packet[..], *dest))
                    .await?;
            } else if let Err(error) = self.send_run(&packets[start..end]).await {
                if !gso_refused(&error) {
                    return Err(error);
                }
                tracing::info!(%error, "UDP GSO refused; the tunnel sends datagram by datagram");
                self.gso.store(false, Ordering::Relaxed);
                // Nothing of this run went out; the rest goes the other way.
                break;
            }
            start = end;
        }
        packets.drain(..start);
        if packets.is_empty() {
            return Ok(());
        }
        self.inner.send_many_to(&mut buf.fallback, packets).await
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        self.inner.max_number_of_packets_to_send()
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        UdpSend::local_addr(&self.inner)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.inner.set_fwmark(mark)
    }
}

impl UdpRecv for GsoSocket {
    type RecvManyBuf = <UdpSocket as UdpRecv>::RecvManyBuf;

    async fn recv_from(&mut self, pool: &mut PacketBufPool) -> io::Result<(Packet, SocketAddr)> {
        self.inner.recv_from(pool).await
    }

    async fn recv_many_from(
        &mut self,
        recv_buf: &mut Self::RecvManyBuf,
        pool: &mut PacketBufPool,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        self.inner.recv_many_from(recv_buf, pool, packets).await
    }

    fn enable_udp_gro(&self) -> io::Result<()> {
        self.inner.enable_udp_gro()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use bytes::BytesMut;
    use gotatun::udp::socket::SockOpt;

    use super::*;

    fn datagram(len: usize, fill: u8, to: SocketAddr) -> (Packet, SocketAddr) {
        datagram_of(&vec![fill; len], to)
    }

    fn datagram_of(bytes: &[u8], to: SocketAddr) -> (Packet, SocketAddr) {
        (Packet::from_bytes(BytesMut::from(bytes)), to)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into()
    }

    #[test]
    fn runs_break_at_a_new_destination_a_larger_datagram_or_after_a_shorter_one() {
        let (a, b) = (addr(1), addr(2));
        let packets = [
            datagram(100, 0, a),
            datagram(100, 1, a),
            datagram(60, 2, a), // shorter: ends the run, included
            datagram(100, 3, a),
            datagram(100, 4, b), // other destination
            datagram(100, 5, b),
            datagram(120, 6, b), // larger: starts a new run
        ];
        let mut runs = Vec::new();
        let mut start = 0;
        while start < packets.len() {
            let end = run_end(&packets, start);
            runs.push(start..end);
            start = end;
        }
        assert_eq!(runs, [0..3, 3..4, 4..6, 6..7]);
    }

    #[test]
    fn runs_stay_within_the_segment_and_byte_limits() {
        let to = addr(1);
        let small: Vec<_> = (0..MAX_SEGMENTS + 5).map(|_| datagram(10, 0, to)).collect();
        assert_eq!(run_end(&small, 0), MAX_SEGMENTS);
        let large: Vec<_> = (0..60).map(|_| datagram(1500, 0, to)).collect();
        let end = run_end(&large, 0);
        assert_eq!(end, MAX_RUN_BYTES / 1500);
    }

    /// Every datagram of a mixed batch arrives whole, in order, with its own
    /// size, whether it went out in a GSO run or alone.
    #[tokio::test]
    async fn a_mixed_batch_arrives_datagram_by_datagram() {
        let socket = GsoSocket::new(UdpSocket::bind(addr(0), SockOpt::default()).unwrap());
        send_and_check_a_mixed_batch(&socket).await;
        assert!(
            socket.gso.load(Ordering::Relaxed),
            "loopback takes GSO sends"
        );
    }

    #[tokio::test]
    async fn without_gso_the_batch_goes_out_the_same() {
        let socket = GsoSocket::new(UdpSocket::bind(addr(0), SockOpt::default()).unwrap());
        socket.gso.store(false, Ordering::Relaxed);
        send_and_check_a_mixed_batch(&socket).await;
    }

    /// gotatun's receive path as patched (`vendor/gotatun/PATCHED.md`, 5):
    /// datagrams are read into pool packets, and only what does not fit
    /// spills into the GRO buffer; every byte arrives in order, each
    /// datagram (or GRO segment) in a packet of its own, whether it fitted,
    /// spilled, or straddles the two.
    #[tokio::test]
    async fn received_datagrams_arrive_whole_whether_they_fit_a_pool_packet_or_spill() {
        let mut receiver = GsoSocket::new(UdpSocket::bind(addr(0), SockOpt::default()).unwrap());
        receiver.enable_udp_gro().unwrap();
        let sender = GsoSocket::new(UdpSocket::bind(addr(0), SockOpt::default()).unwrap());
        let to = receiver.inner.local_addr().unwrap();
        let pattern = |len: usize, seed: usize| -> Vec<u8> {
            (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
        };

        // Plain datagrams: one that fits, one exactly a packet's size, one
        // larger.
        let mut expected = Vec::new();
        for (seed, len) in [(1, 300), (2, 4096), (3, 9000)] {
            let datagram = pattern(len, seed);
            sender
                .send_to(datagram_of(&datagram, to).0, to)
                .await
                .unwrap();
            expected.push(datagram);
        }
        // A GSO run of ten 1000-byte datagrams: with GRO it arrives as one
        // message whose fifth segment straddles the pool packet's end.
        let run = pattern(10_000, 4);
        let batch: Vec<_> = run
            .chunks(1000)
            .map(|bytes| datagram_of(bytes, to))
            .collect();
        sender.send_run(&batch).await.unwrap();
        expected.extend(run.chunks(1000).map(<[u8]>::to_vec));

        let mut pool = PacketBufPool::<4096>::new(1);
        let mut buf = <GsoSocket as UdpRecv>::RecvManyBuf::default();
        let mut got = Vec::new();
        while got.len() < expected.len() {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                receiver.recv_many_from(&mut buf, &mut pool, &mut got),
            )
            .await
            .unwrap()
            .unwrap();
        }
        let got: Vec<Vec<u8>> = got.iter().map(|(p, _)| p.to_vec()).collect();
        assert_eq!(got.len(), expected.len());
        for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(got, expected, "datagram {i}");
        }
    }

    /// A short batch clears the socket's readiness without a second
    /// `recvmmsg` (patch 5); the next datagram must still wake the reader,
    /// whether it comes while the reader waits or before it asks.
    #[tokio::test]
    async fn after_a_short_batch_the_next_datagram_still_wakes_the_reader() {
        let mut receiver = GsoSocket::new(UdpSocket::bind(addr(0), SockOpt::default()).unwrap());
        let sender = std::net::UdpSocket::bind(addr(0)).unwrap();
        let to = receiver.inner.local_addr().unwrap();
        let mut pool = PacketBufPool::<4096>::new(1);
        let mut buf = <GsoSocket as UdpRecv>::RecvManyBuf::default();
        for round in 0..50u8 {
            let mut got = Vec::new();
            let receive = receiver.recv_many_from(&mut buf, &mut pool, &mut got);
            if round % 2 == 0 {
                sender.send_to(&[round], to).unwrap();
                tokio::time::timeout(std::time::Duration::from_secs(5), receive)
                    .await
                    .unwrap()
                    .unwrap();
            } else {
                let (result, ()) = tokio::join!(
                    tokio::time::timeout(std::time::Duration::from_secs(5), receive),
                    async {
                        tokio::task::yield_now().await;
                        sender.send_to(&[round], to).unwrap();
                    }
                );
                result.unwrap().unwrap();
            }
            assert_eq!(got.len(), 1, "round {round}");
            assert_eq!(&got[0].0[..], &[round], "round {round}");
        }
    }

    async fn send_and_check_a_mixed_batch(socket: &GsoSocket) {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let to = receiver.local_addr().unwrap();
        let sizes = [1440, 1440, 1440, 1440, 700, 1440, 1440, 32, 1, 1440];
        let mut batch: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| datagram(len, i as u8, to))
            .collect();
        let mut buf = SendBuf::default();
        socket.send_many_to(&mut buf, &mut batch).await.unwrap();
        assert!(batch.is_empty());
        let mut got = [0u8; 2048];
        for (i, &len) in sizes.iter().enumerate() {
            let n = receiver.recv(&mut got).unwrap();
            assert_eq!(n, len, "datagram {i}");
            assert!(got[..n].iter().all(|&b| b == i as u8), "datagram {i}");
        }
    }
}
