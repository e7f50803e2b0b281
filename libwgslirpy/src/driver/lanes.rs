//! A router task's way into the tunnel's encryption lanes.
//!
//! The tunnel encrypts each lane on a task of its own, and each peer's
//! packets go to one lane ([`tunnel::lane_of`]), so one peer's packets keep
//! their order and different peers' are encrypted in parallel. Which lane a
//! packet takes is known only once the router has handed it over (TCP
//! segments are made when asked for), so a packet whose lane is full is held
//! here, one at most, and the task waits for room in that lane before it
//! takes another: one full lane holds the shard's other packets back, as
//! one shared channel did, and nothing queues without bound.

use tokio::sync::mpsc;

use crate::core::Router;
use crate::tunnel::{self, IpPacket};

/// The lanes' senders, and the packet waiting for room in its lane.
pub(super) struct Lanes {
    senders: Vec<mpsc::Sender<IpPacket>>,
    held: Option<(usize, IpPacket)>,
}

/// The tunnel has stopped.
#[derive(Debug)]
pub(super) struct Closed;

impl Lanes {
    /// Lanes over the tunnel's `outgoing` senders, in lane order.
    pub(super) fn new(senders: Vec<mpsc::Sender<IpPacket>>) -> Self {
        Lanes {
            senders,
            held: None,
        }
    }

    /// Moves packets from `router` into their lanes until the router has no
    /// more or one's lane is full (that one is then held).
    pub(super) fn fill(&mut self, router: &mut Router) -> Result<(), Closed> {
        while self.held.is_none() {
            let Some((packet, peer)) = router.poll_transmit_to_peer() else {
                break;
            };
            let lane = tunnel::lane_of(peer, self.senders.len());
            match self.senders[lane].try_send(packet) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(packet)) => self.held = Some((lane, packet)),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Closed),
            }
        }
        Ok(())
    }

    /// The lane that the held packet waits for, if one does: wait for
    /// [`room`] in it, then [`Lanes::send_held`]. A handle of its own, so
    /// that waiting borrows nothing of the driver.
    pub(super) fn blocked_lane(&self) -> Option<mpsc::Sender<IpPacket>> {
        self.held
            .as_ref()
            .map(|&(lane, _)| self.senders[lane].clone())
    }

    /// Sends the held packet with `permit`, room in its lane.
    pub(super) fn send_held(&mut self, permit: mpsc::Permit<'_, IpPacket>) {
        if let Some((_, packet)) = self.held.take() {
            permit.send(packet);
        }
    }

    /// Whether nothing is held and every lane is empty: the tunnel has
    /// taken every packet.
    pub(super) fn is_flushed(&self) -> bool {
        self.held.is_none()
            && self
                .senders
                .iter()
                .all(|lane| lane.capacity() == lane.max_capacity())
    }
}

/// Room in `lane`, the held packet's ([`Lanes::blocked_lane`]); never
/// ready without one.
pub(super) async fn room(
    lane: &Option<mpsc::Sender<IpPacket>>,
) -> Result<mpsc::Permit<'_, IpPacket>, mpsc::error::SendError<()>> {
    match lane {
        Some(lane) => lane.reserve().await,
        None => std::future::pending().await,
    }
}
