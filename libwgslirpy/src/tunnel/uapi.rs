//! WireGuard's configuration protocol on a UNIX socket (`--uapi-socket`).
//!
//! `wg show NAME` and `wg set NAME …` talk to `/var/run/wireguard/NAME.sock`
//! with WireGuard's cross-platform configuration protocol. gotatun's device
//! speaks that protocol; this module only owns the socket. It binds the path
//! the user chose (which need not be under `/var/run/wireguard`, so an
//! unprivileged gateway can use a directory of its own), accepts
//! connections, and hands each one to gotatun, which serves it on a thread
//! of its own until the client hangs up. At most [`MAX_CONNECTIONS`] are
//! served at once; more are closed at once. Dropping [`UapiSocket`] stops
//! accepting and removes the socket file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use gotatun::device::uapi::{UapiClient, UapiServer};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// Most configuration connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

/// The listening socket; dropping it stops the service.
pub(super) struct UapiSocket {
    path: PathBuf,
    accept: JoinHandle<()>,
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` and starts serving it. Returns the server end for the
/// device builder, and the socket that keeps the service alive.
pub(super) fn serve(path: &Path) -> io::Result<(UapiServer, UapiSocket)> {
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    let (client, server) = UapiServer::new();
    let accept = tokio::spawn(accept_loop(listener, client));
    tracing::info!(path = %path.display(), "serving WireGuard's configuration protocol");
    Ok((
        server,
        UapiSocket {
            path: path.to_owned(),
            accept,
        },
    ))
}

/// Removes a socket left by an earlier run. Refuses to remove anything that
/// is not a socket.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

async fn accept_loop(listener: UnixListener, client: UapiClient) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "configuration socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!("configuration socket: too many connections; closing a new one");
            continue;
        }
        let stream = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(s)
        }) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "configuration socket: cannot serve a connection");
                continue;
            }
        };
        active.fetch_add(1, Ordering::Relaxed);
        client.clone().wrap_read_write(CountedStream {
            stream,
            active: active.clone(),
        });
    }
}

/// A connection that counts itself out of the active ones when gotatun's
/// thread drops it.
struct CountedStream {
    stream: std::os::unix::net::UnixStream,
    active: Arc<AtomicUsize>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl io::Read for &CountedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.stream).read(buf)
    }
}

impl io::Write for &CountedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&self.stream).flush()
    }
}
