//! WireGuard transport (being written).
use super::{TunnelError, TunnelHandle};
use crate::config::{Config, Key, PeerConfig};

pub(super) struct Running;

pub(super) async fn start(
    _config: &Config,
    _key: &Key,
    _peers: &[PeerConfig],
) -> Result<TunnelHandle, TunnelError> {
    unimplemented!()
}
