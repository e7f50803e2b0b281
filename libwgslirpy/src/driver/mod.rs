//! The tokio driver (being written).
use crate::Config;

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The tunnel transport could not start.
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::TunnelError),
}

/// Runs the gateway until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let _tunnel = crate::tunnel::start(&config).await?;
    shutdown.await;
    Ok(())
}
