//! # libwgslirpy: a user-space WireGuard-to-internet router
//!
//! Like SLiRP, but with WireGuard instead of PPP: a peer's IP packets arrive
//! over a WireGuard tunnel (or bare, in UDP), and the router carries the
//! traffic they hold to the real network through the operating system's
//! ordinary socket API. No TUN device, no kernel module, no privileges.
//!
//! ## Layers
//! - [`config`]: validated settings, shared by every front end.
//! - [`config_file`]: WireGuard-format configuration files (`wg-quick`'s
//!   `[Interface]` and `[Peer]`, plus a `[wgslirpy]` section).
//! - [`tunnel`]: transports that turn UDP datagrams into plain IP packets
//!   per peer, and back (WireGuard through gotatun, or raw IP over UDP).
//! - [`core`]: the router itself, a deterministic state machine. Packets and
//!   socket events go in, packets and socket actions come out, time is
//!   passed in. It does no I/O and never reads the clock.
//! - [`driver`]: the thin tokio layer that owns the sockets and timers and
//!   carries out what the core asks for.
//!
//! - [`metrics`]: Prometheus metrics and a health check over HTTP.
//!
//! [`run`] wires them together; an embedding program calls it with a
//! [`Config`] and a shutdown future. [`Gateway`] does the same in two
//! steps, with a [`GatewayHandle`] in between for counters and peer
//! reloads while it runs.

pub mod config;
pub mod config_file;
pub mod core;
pub mod driver;
pub mod metrics;
pub mod tunnel;

pub use config::Config;
pub use driver::{Gateway, GatewayHandle, RunError, run};
