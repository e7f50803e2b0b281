//! `wgslirpy`: expose internet access without root using WireGuard.
//!
//! This binary only parses flags, sets up logging and signals, and runs a
//! [`libwgslirpy::Gateway`]. Exit codes: 0 after a clean shutdown (SIGINT or
//! SIGTERM), 1 when the gateway cannot start or fails, 2 for a command line
//! that does not parse.
//!
//! Signals: SIGINT and SIGTERM stop the gateway gracefully (every flow is
//! closed toward both sides, then the process exits 0 within 2 s); SIGHUP
//! re-reads the config file (`-c`) and applies its peer list to the running
//! gateway, keeping the sessions of unchanged peers ([`reload_on_sighup`]).

mod args;
mod setup;

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::Context as _;
use libwgslirpy::config::{Key, Transport};

use args::{Cli, Command, GatewayArgs, LogFormat};

/// How long the runtime waits for blocking work (a resolver call, say)
/// after the gateway has stopped, before the process exits anyway.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(300);

fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) => return report_usage_error(error),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wgslirpy: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints help and version normally, and any other parse error as one line.
fn report_usage_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    // Clap spreads its message over several lines, then adds usage; keep
    // the message, on one line.
    let rendered = error.render().to_string();
    let message = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("wgslirpy: error: {message} (see --help)");
    ExitCode::from(2)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Genkey) => {
            println!("{}", Key::generate_private().to_base64());
            Ok(())
        }
        Some(Command::Pubkey) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the private key from standard input")?;
            let private = Key::from_base64(&text).context("standard input")?;
            println!("{}", private.public_key().to_base64());
            Ok(())
        }
        Some(Command::Init {
            endpoint,
            config,
            force,
        }) => {
            let peer = setup::init(&config, &endpoint, force)?;
            print_new_peer(&peer)?;
            eprintln!(
                "wrote the gateway config {path}; start the gateway with: wgslirpy -c {path}",
                path = config.display()
            );
            Ok(())
        }
        Some(Command::AddPeer {
            config,
            name,
            endpoint,
        }) => {
            let peer = setup::add_peer(&config, name.as_deref(), endpoint.as_deref())?;
            print_new_peer(&peer)?;
            eprintln!(
                "added peer {} to {}; send the running gateway SIGHUP to load it",
                peer.number,
                config.display()
            );
            Ok(())
        }
        None => serve(cli.gateway),
    }
}

/// Prints a new peer's wg-quick config, then the same as a QR code.
fn print_new_peer(peer: &setup::NewPeer) -> anyhow::Result<()> {
    let qr = peer.qr_code()?;
    println!(
        "# wg-quick config of peer {}: import it, or scan the QR code below\n{}\n{qr}",
        peer.number, peer.config
    );
    Ok(())
}

fn serve(args: GatewayArgs) -> anyhow::Result<()> {
    let log_format = args.log_format;
    let threads = args.worker_threads();
    // Kept to re-read the config file on SIGHUP, with the same flags on top.
    let reload = args.config_file().is_some().then(|| args.clone());
    let config = args.into_config()?;
    init_logging(log_format);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tracing::debug!(threads, "runtime started");
    let result = runtime.block_on(async {
        // Before anything else, so that an early SIGHUP does not kill us.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot watch SIGHUP")?;
        let gateway = libwgslirpy::Gateway::bind(config.clone()).await?;
        let reloader = tokio::spawn(reload_on_sighup(hangup, reload, config, gateway.handle()));
        // On a worker, not here in `block_on`: the router task then wakes
        // on the worker that ran the tunnel task waking it, instead of
        // crossing to this thread for every packet.
        let result = tokio::spawn(gateway.run(shutdown_signal()))
            .await
            .context("the gateway task failed")?;
        reloader.abort();
        anyhow::Ok(result?)
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

/// On each SIGHUP: re-reads the config file as at startup (flags on top),
/// and gives the gateway its peer list. The running settings stay; if the
/// file changed any of them, one line says they need a restart. A file
/// with an error is one error line, and the old peers stay.
async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    args: Option<GatewayArgs>,
    mut running: libwgslirpy::Config,
    gateway: libwgslirpy::GatewayHandle,
) {
    while hangup.recv().await.is_some() {
        let Some(args) = &args else {
            tracing::info!("SIGHUP ignored: there is no config file (-c) to reload");
            continue;
        };
        let path = args
            .config_file()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        tracing::info!(file = %path, "SIGHUP: reloading the peers");
        // Blocking: reads files and resolves Endpoint host names.
        let args = args.clone();
        let loaded = tokio::task::spawn_blocking(move || args.into_config()).await;
        let new = match loaded {
            Ok(Ok(new)) => new,
            Ok(Err(error)) => {
                tracing::error!("cannot reload: {error:#}; keeping the old peers");
                continue;
            }
            Err(error) => {
                tracing::error!("cannot reload {path}: {error}; keeping the old peers");
                continue;
            }
        };
        let Transport::WireGuard { peers, .. } = &new.transport else {
            continue;
        };
        let peers = peers.clone();
        if settings_differ(&running, &new) {
            tracing::warn!(
                file = %path,
                "settings other than the peers changed; they take effect at the next start"
            );
        }
        match gateway.reload_peers(peers.clone()).await {
            Ok(changes) => {
                tracing::info!(
                    file = %path,
                    added = changes.added,
                    removed = changes.removed,
                    updated = changes.updated,
                    unchanged = changes.unchanged,
                    "peers reloaded"
                );
                if let Transport::WireGuard { peers: now, .. } = &mut running.transport {
                    *now = peers;
                }
            }
            Err(error) => tracing::error!("cannot apply the reloaded peers: {error}"),
        }
    }
}

/// Whether `a` and `b` differ in anything but their peer lists.
fn settings_differ(a: &libwgslirpy::Config, b: &libwgslirpy::Config) -> bool {
    let without_peers = |config: &libwgslirpy::Config| {
        let mut config = config.clone();
        if let Transport::WireGuard { peers, .. } = &mut config.transport {
            peers.clear();
        }
        format!("{config:?}")
    };
    without_peers(a) != without_peers(b)
}

/// Logs to stderr, filtered by `RUST_LOG`, as text or as JSON lines. The
/// default shows our own `info` lines and only warnings from gotatun, whose
/// `info` lines say nothing a user can act on.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,gotatun=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
}
