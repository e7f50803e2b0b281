//! Talking to a running gateway: counters, health and peer reloads.
//!
//! # Theory of operation
//!
//! The router is owned by one task (see the parent module), and nothing
//! else may touch it: no lock sits on the per-packet path. Other tasks (the
//! metrics server, a SIGHUP handler, an embedding program) hold a
//! [`GatewayHandle`] and send [`Request`]s over a small bounded channel
//! ([`CONTROL_QUEUE`]) that the router task polls beside its other inputs.
//! A snapshot request is answered with a copy of the router's
//! [`Stats`] and [`Occupancy`] through a oneshot channel: a few hundred
//! bytes copied per scrape, nothing per packet. When the channel is full
//! the requester waits, never the router.
//!
//! Per-peer counters come from the tunnel (gotatun's device), through the
//! [`TunnelControl`] in the handle, without involving the router task.
//!
//! A peer reload changes the tunnel's peers first ([`TunnelControl::set_peers`]),
//! then tells the router task the new list ([`Request::PeersReloaded`]), so
//! that the router's own per-peer state can follow.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::PeerConfig;
use crate::core::{Occupancy, Stats};
use crate::tunnel::{PeerChanges, TunnelControl, TunnelError, TunnelStatus};

/// Requests that may wait for the router task at once; more senders wait.
pub const CONTROL_QUEUE: usize = 8;

/// How long [`GatewayHandle::router_snapshot`] waits for the router task
/// before it reports the gateway as not answering.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// What other tasks ask of the router task.
#[derive(Debug)]
pub(crate) enum Request {
    /// Send back a copy of the counters.
    Snapshot(oneshot::Sender<RouterSnapshot>),
    /// The tunnel's peers are now these (after a successful reload).
    PeersReloaded(Vec<PeerConfig>),
}

/// The router's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterSnapshot {
    /// Everything counted since startup.
    pub stats: Stats,
    /// How full the bounded tables are.
    pub occupancy: Occupancy,
    /// Each peer's inner packets and bytes, and its flows.
    pub peers: Vec<crate::core::PeerStats>,
    /// Whether the gateway is shutting down.
    pub shutting_down: bool,
}

/// Why a request to the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The router task has stopped (or did not answer within
    /// [`SNAPSHOT_TIMEOUT`]).
    #[error("the gateway is not running")]
    NotRunning,
    /// The tunnel refused the change.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

/// A cheap, cloneable handle on a running gateway, from
/// [`super::Gateway::handle`]. It does not keep the gateway running.
#[derive(Clone)]
pub struct GatewayHandle {
    pub(crate) requests: mpsc::Sender<Request>,
    pub(crate) tunnel: TunnelControl,
}

impl GatewayHandle {
    /// A copy of the router's counters. Fails if the router task has
    /// stopped or does not answer within [`SNAPSHOT_TIMEOUT`], which is
    /// what the health check reports.
    pub async fn router_snapshot(&self) -> Result<RouterSnapshot, ControlError> {
        let ask = async {
            let (reply, answer) = oneshot::channel();
            self.requests
                .send(Request::Snapshot(reply))
                .await
                .map_err(|_| ControlError::NotRunning)?;
            answer.await.map_err(|_| ControlError::NotRunning)
        };
        tokio::time::timeout(SNAPSHOT_TIMEOUT, ask)
            .await
            .map_err(|_| ControlError::NotRunning)?
    }

    /// Every WireGuard peer's counters and the device's own, from the
    /// tunnel; nothing in raw IP mode or once the tunnel has stopped.
    pub async fn tunnel_status(&self) -> TunnelStatus {
        self.tunnel.status().await
    }

    /// Replaces the peer list without dropping the sessions of peers that
    /// stay (see [`TunnelControl::set_peers`]), then tells the router.
    pub async fn reload_peers(&self, peers: Vec<PeerConfig>) -> Result<PeerChanges, ControlError> {
        let changes = self.tunnel.set_peers(&peers).await?;
        self.requests
            .send(Request::PeersReloaded(peers))
            .await
            .map_err(|_| ControlError::NotRunning)?;
        Ok(changes)
    }
}
