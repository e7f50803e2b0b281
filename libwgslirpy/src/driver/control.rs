//! Talking to a running gateway: counters, health and peer reloads.
//!
//! # Theory of operation
//!
//! Each router shard is owned by one task (see the parent module), and
//! nothing else may touch it: no lock sits on the per-packet path. Other
//! tasks (the metrics server, a SIGHUP handler, an embedding program) hold a
//! [`GatewayHandle`] and send [`Request`]s over a small bounded channel per
//! shard ([`CONTROL_QUEUE`]) that the router task polls beside its other
//! inputs. A snapshot request is answered with a copy of the router's
//! [`Stats`] and [`Occupancy`] through a oneshot channel: a few hundred
//! bytes copied per scrape, nothing per packet; the handle adds up the
//! shards' copies. When a channel is full the requester waits, never the
//! router.
//!
//! Per-peer counters come from the tunnel (gotatun's device), through the
//! [`TunnelControl`] in the handle, without involving the router task.
//!
//! A peer reload changes the tunnel's peers first ([`TunnelControl::set_peers`]),
//! then tells the router task the new list ([`Request::PeersReloaded`]), so
//! that the routers' own per-peer state can follow.

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

impl RouterSnapshot {
    /// Adds another shard's figures to these. Both list the same peers in
    /// the same order: every shard is told of every peer change.
    pub(crate) fn add(&mut self, other: &RouterSnapshot) {
        self.stats.add(&other.stats);
        self.occupancy.add(&other.occupancy);
        if self.peers.is_empty() {
            self.peers.clone_from(&other.peers);
        } else {
            for (mine, theirs) in self.peers.iter_mut().zip(&other.peers) {
                mine.counters.add(&theirs.counters);
                mine.occupancy.add(&theirs.occupancy);
            }
        }
        self.shutting_down |= other.shutting_down;
    }
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
    /// One channel per router shard.
    pub(crate) requests: Vec<mpsc::Sender<Request>>,
    pub(crate) tunnel: TunnelControl,
}

impl GatewayHandle {
    /// A copy of the router's counters, summed over its shards. Fails if a
    /// router task has stopped or does not answer within
    /// [`SNAPSHOT_TIMEOUT`], which is what the health check reports.
    pub async fn router_snapshot(&self) -> Result<RouterSnapshot, ControlError> {
        let ask = async {
            let mut total = RouterSnapshot::default();
            for requests in &self.requests {
                let (reply, answer) = oneshot::channel();
                requests
                    .send(Request::Snapshot(reply))
                    .await
                    .map_err(|_| ControlError::NotRunning)?;
                total.add(&answer.await.map_err(|_| ControlError::NotRunning)?);
            }
            Ok(total)
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
        self.tell_peers(&peers).await?;
        Ok(changes)
    }

    /// Tells every router shard that the tunnel's peers are now `peers`.
    pub(crate) async fn tell_peers(&self, peers: &[PeerConfig]) -> Result<(), ControlError> {
        for requests in &self.requests {
            requests
                .send(Request::PeersReloaded(peers.to_vec()))
                .await
                .map_err(|_| ControlError::NotRunning)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{PeerCounters, PeerOccupancy, PeerStats};

    /// A shard's answer: `n` of everything.
    fn shard_snapshot(n: u64) -> RouterSnapshot {
        let mut snapshot = RouterSnapshot::default();
        snapshot.stats.packets_in = n;
        snapshot.stats.tcp_closed = 10 * n;
        snapshot.occupancy.udp_flows = n as usize;
        snapshot.peers = vec![PeerStats {
            public_key: None,
            counters: PeerCounters {
                bytes_from: 100 * n,
                ..PeerCounters::default()
            },
            occupancy: PeerOccupancy {
                tcp_connections: n as usize,
                ..PeerOccupancy::default()
            },
        }];
        snapshot
    }

    #[tokio::test]
    async fn a_snapshot_sums_every_shard_and_a_reload_reaches_each() {
        let mut requests = Vec::new();
        let mut reloads = Vec::new();
        for n in [1, 2, 4] {
            let (sender, mut control) = mpsc::channel(CONTROL_QUEUE);
            let (told, heard) = oneshot::channel();
            reloads.push(heard);
            tokio::spawn(async move {
                let mut told = Some(told);
                while let Some(request) = control.recv().await {
                    match request {
                        Request::Snapshot(reply) => drop(reply.send(shard_snapshot(n))),
                        Request::PeersReloaded(peers) => {
                            if let Some(told) = told.take() {
                                let _ = told.send(peers.len());
                            }
                        }
                    }
                }
            });
            requests.push(sender);
        }
        let handle = GatewayHandle {
            requests,
            tunnel: TunnelControl::detached(),
        };
        let total = handle.router_snapshot().await.unwrap();
        assert_eq!(total.stats.packets_in, 7);
        assert_eq!(total.stats.tcp_closed, 70);
        assert_eq!(total.occupancy.udp_flows, 7);
        assert_eq!(total.peers.len(), 1);
        assert_eq!(total.peers[0].counters.bytes_from, 700);
        assert_eq!(total.peers[0].occupancy.tcp_connections, 7);

        handle.tell_peers(&[]).await.unwrap();
        for heard in reloads {
            assert_eq!(heard.await.unwrap(), 0);
        }
    }
}
