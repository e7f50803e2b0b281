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
//!
//! ## Embedding the router with your own I/O
//! A program with its own tunnel or socket layer can drive
//! [`core::Router`] directly: feed it packets and socket events with the
//! current time, carry out the [`core::SocketAction`]s it asks for, send
//! what [`core::Router::poll_transmit`] returns to the peer, and call
//! [`core::Router::handle_timeout`] at [`core::Router::poll_timeout`].
//! `examples/embed.rs` does all of it with `std` sockets on the loopback
//! (`cargo run -p libwgslirpy --example embed`).
//!
//! ```
//! use std::time::Instant;
//! use libwgslirpy::Config;
//! use libwgslirpy::config::Transport;
//! use libwgslirpy::core::{Router, SocketAction, packet};
//!
//! let mut config = Config::new(
//!     Transport::RawIp { peer_endpoint: None },
//!     "127.0.0.1:0".parse().unwrap(),
//! );
//! config.max_udp_flows = 64; // per peer
//! let mut router = Router::new(&config);
//!
//! // A packet from the peer: a UDP datagram to somewhere.
//! let from_peer = packet::build_udp(
//!     "10.0.2.15:5000".parse().unwrap(),
//!     "192.0.2.7:7".parse().unwrap(),
//!     b"hello",
//! )
//! .unwrap();
//! router.handle_packet(Instant::now(), &from_peer);
//!
//! // Carry out the socket actions first ...
//! let mut opened = None;
//! while let Some(action) = router.poll_socket_action() {
//!     match action {
//!         SocketAction::UdpOpen { flow, .. } => opened = Some(flow), // bind a socket
//!         SocketAction::UdpSend { dest, payload, .. } => {
//!             assert_eq!((dest.port(), &payload[..]), (7, &b"hello"[..])); // send it
//!         }
//!         _ => {} // TCP, ICMP, DNS ...: see `SocketAction`
//!     }
//! }
//! // ... then hand the router's packets to the peer, and re-arm the timer.
//! while let Some(to_peer) = router.poll_transmit() {
//!     let _ = to_peer;
//! }
//! let _next_deadline = router.poll_timeout();
//!
//! // A reply arrives on the flow's socket: it goes back to the peer.
//! let flow = opened.unwrap();
//! router.handle_udp_datagram(Instant::now(), flow, "192.0.2.7:7".parse().unwrap(), b"hi!");
//! assert!(router.poll_transmit().is_some());
//! assert_eq!(router.peer_stats()[0].counters.packets_to, 1);
//! ```

#![warn(missing_docs)]
// The theory-of-operation comments of public modules name the private
// modules that do the work.
#![allow(rustdoc::private_intra_doc_links)]

pub mod config;
pub mod config_file;
pub mod core;
pub mod driver;
pub mod metrics;
pub mod tunnel;

pub use config::Config;
pub use driver::{Gateway, GatewayHandle, RunError, run};
