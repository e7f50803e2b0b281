//! Which flows' host sockets need service, for sockets serviced in place.
//!
//! The router task does the socket calls of TCP ([`super::tcp`]), UDP
//! ([`super::udp`]) and ICMP echo ([`super::icmp`]) flows itself; no flow
//! has a task. Each socket gets a
//! waker of its own ([`FlowWaker`]) that tokio's reactor calls when the
//! socket turns ready: it puts the flow on a shared list and wakes the
//! router task. [`DueFlows`] keeps that list with the flows the core made
//! due (bytes to write, say), and hands them out in batches, each flow once.
//! [`read_until_blocked`] is the read loop of datagram sockets.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::unix::AsyncFd;

use crate::core::FlowId;

/// Flows that tokio's reactor found ready, and the router task's waker.
#[derive(Default)]
struct ReadyList {
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    flows: Vec<FlowId>,
    waker: Option<Waker>,
}

impl ReadyList {
    fn push(&self, flow: FlowId) {
        let waker = match self.state.lock() {
            Ok(mut state) => {
                state.flows.push(flow);
                state.waker.take()
            }
            Err(_) => None,
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The waker tokio's reactor calls for one flow's socket. It queues the
/// flow at most once until the router task services it.
struct FlowWaker {
    flow: FlowId,
    queued: AtomicBool,
    ready: Arc<ReadyList>,
}

impl Wake for FlowWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.push(self.flow);
        }
    }
}

/// One flow's socket waker, to register with tokio when a socket call
/// would block.
pub(super) struct SocketWaker {
    flow_waker: Arc<FlowWaker>,
    waker: Waker,
}

impl SocketWaker {
    /// Called as the flow's service starts: from here on a readiness
    /// queues the flow again. Returns the waker to register.
    pub(super) fn rearm(&self) -> Waker {
        self.flow_waker.queued.store(false, Ordering::Release);
        self.waker.clone()
    }
}

/// The flows due for service.
#[derive(Default)]
pub(super) struct DueFlows {
    ready: Arc<ReadyList>,
    /// Flows to service next.
    due: Vec<FlowId>,
    /// The flows being serviced; kept to reuse its allocation.
    batch: Vec<FlowId>,
}

impl DueFlows {
    /// A waker for the socket of `flow`.
    pub(super) fn waker(&self, flow: FlowId) -> SocketWaker {
        let flow_waker = Arc::new(FlowWaker {
            flow,
            queued: AtomicBool::new(false),
            ready: self.ready.clone(),
        });
        let waker = Waker::from(flow_waker.clone());
        SocketWaker { flow_waker, waker }
    }

    /// Makes `flow` due for service.
    pub(super) fn push(&mut self, flow: FlowId) {
        self.due.push(flow);
    }

    /// Ready when some flow is due: the reactor found its socket ready, or
    /// it was pushed.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.take_ready();
        if !self.due.is_empty() {
            return Poll::Ready(());
        }
        let Ok(mut state) = self.ready.state.lock() else {
            return Poll::Pending;
        };
        if !state.flows.is_empty() {
            return Poll::Ready(());
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Calls `service` once for each flow due now, in order. A flow for
    /// which it returns false stays due: it had more waiting than one
    /// service takes. Flows that become due meanwhile wait for the next
    /// call. Returns whether any flow was due.
    pub(super) fn service_each(&mut self, mut service: impl FnMut(FlowId) -> bool) -> bool {
        self.take_ready();
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        std::mem::swap(&mut self.due, &mut batch);
        batch.sort_unstable();
        batch.dedup();
        for &flow in &batch {
            if !service(flow) {
                self.due.push(flow);
            }
        }
        let any = !batch.is_empty();
        self.batch = batch;
        any
    }

    /// Moves the flows the reactor found ready to the due list.
    fn take_ready(&mut self) {
        if let Ok(mut state) = self.ready.state.lock() {
            self.due.append(&mut state.flows);
        }
    }
}

/// Calls `read` on `socket` until it reports `WouldBlock`, which clears the
/// socket's readiness and registers `cx` for the next, or until it was
/// called `calls` times, or until `budget` (shared by the caller's sockets)
/// is spent. `read` handles every other outcome itself, and returns
/// `Ok(true)` for a message read, which takes one from `budget`. Returns
/// false if a bound stopped it, with more perhaps waiting.
pub(super) fn read_until_blocked<T: AsRawFd>(
    socket: &AsyncFd<T>,
    cx: &mut Context<'_>,
    calls: usize,
    budget: &mut usize,
    mut read: impl FnMut(&T) -> io::Result<bool>,
) -> bool {
    for _ in 0..calls {
        if *budget == 0 {
            return false;
        }
        let mut guard = match socket.poll_read_ready(cx) {
            Poll::Pending => return true,
            Poll::Ready(Ok(guard)) => guard,
            // Only a reactor shutting down fails here.
            Poll::Ready(Err(_)) => return true,
        };
        // `Err` is `WouldBlock`, with the readiness now cleared.
        if let Ok(Ok(true)) = guard.try_io(|socket| read(socket.get_ref())) {
            *budget -= 1;
        }
    }
    false
}
