//! Raw IP over UDP transport (being written).
use super::{TunnelError, TunnelHandle};
use crate::config::Config;
use std::net::SocketAddr;

pub(super) struct Running;

pub(super) async fn start(
    _config: &Config,
    _peer: Option<SocketAddr>,
) -> Result<TunnelHandle, TunnelError> {
    unimplemented!()
}
