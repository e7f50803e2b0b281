//! `wgslirpy`: expose internet access without root using WireGuard.
//!
//! This binary only parses flags, sets up logging and signals, and calls
//! [`libwgslirpy::run`]. Exit codes: 0 after a clean shutdown (SIGINT or
//! SIGTERM), 1 when the gateway cannot start or fails, 2 for a command line
//! that does not parse.

mod args;
mod setup;

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::Context as _;
use libwgslirpy::config::Key;

use args::{Cli, Command};

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
                "added peer {} to {}; restart the gateway to use it",
                peer.number,
                config.display()
            );
            Ok(())
        }
        None => serve(cli.gateway.into_config()?),
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

fn serve(config: libwgslirpy::Config) -> anyhow::Result<()> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(libwgslirpy::run(config, shutdown_signal()))?;
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG`. The default shows our own
/// `info` lines and only warnings from gotatun, whose `info` lines say
/// nothing a user can act on.
fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,gotatun=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
