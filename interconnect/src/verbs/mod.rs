//! The verbs: access layer, protection domains, memory regions, completion
//! queues and queue pairs, plus the per-QP progress engine that is the same
//! for every transport.
//!
//! One concept per file:
//! * `context.rs`: the access layer ([`Context`]): opening it, its ports and
//!   remote ports, creating PDs, CQs and QPs, connecting, async events,
//!   port reset and close.
//! * `pd.rs`: protection domains ([`Pd`]) and memory regions ([`Mr`]):
//!   registration, lkey/rkey tables, access-flag and bounds checks,
//!   deregistration.
//! * `cq.rs`: completion queues ([`Cq`]): the bounded queue, overflow,
//!   one-shot notification (eventfd and callback), polling.
//! * `qp.rs`: queue pairs ([`Qp`]): capacities, state, `post_send` and
//!   `post_recv`, completions in posting order, flush and destroy.
//! * `engine.rs`: the progress engine: the per-QP thread and the code that
//!   applies the peer's requests (SEND, WRITE, READ) and its responses.

mod context;
mod cq;
mod engine;
mod pd;
mod qp;
#[cfg(test)]
mod testing;

pub use context::{Context, ContextAttr, ContextOptions, PortAttr, RemotePort};
pub use cq::Cq;
pub use pd::{Mr, Pd};
pub use qp::{Qp, QpCaps, QpState, MAX_RECV_WR, MAX_SEND_WR};

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// A random 32-bit value (memory keys).
fn random_u32() -> u32 {
    let mut v = 0u32;
    // SAFETY: getrandom writes at most 4 bytes into the local u32.
    let n = unsafe { libc::getrandom((&mut v as *mut u32).cast(), 4, 0) };
    if n != 4 {
        // Fall back to a time-derived value; keys stay unique via the table check.
        v = Instant::now().elapsed().subsec_nanos() ^ std::process::id();
    }
    v
}

/// Monotonic nanoseconds since the first call in this process.
fn now_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Waits up to `timeout` for one of `fds` to become readable; true if one did.
pub(crate) fn poll_fds(fds: &[RawFd], timeout: Duration) -> bool {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: p is a valid pollfd array of the given length.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use channels::Doorbell;
    use std::os::fd::AsRawFd;

    #[test]
    fn poll_fds_times_out_on_a_quiet_fd_and_sees_a_rung_one() {
        let bell = Doorbell::new().unwrap();
        let fd = bell.fd().as_raw_fd();
        assert!(!poll_fds(&[fd], Duration::from_millis(5)));
        bell.notify().unwrap();
        assert!(poll_fds(&[fd], Duration::from_millis(5)));
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now_ns() >= a + 2_000_000);
    }
}
