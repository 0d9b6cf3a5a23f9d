//! # partvisor-runtime: what every partvisor process does the same way
//!
//! Conventions that partd, part-vmm and part-io (and the interconnect's
//! helpers) share, so that they are written once:
//!
//! - [`init_logging`]: logs go to stderr through `tracing`, filtered by the
//!   one variable [`LOG_ENV`] (`PARTVISOR_LOG`, a `tracing` filter such as
//!   `info` or `part_io=debug`), `info` when it is unset, and capped in
//!   size ([`ratelimit`]). Colours only when stderr is a terminal, so files
//!   and journald get plain text.
//! - [`ratelimit`]: a rate limit per kind of line an untrusted party can
//!   cause, with the count of what it suppressed.
//! - [`sync`]: locks that keep working after a thread panicked while holding
//!   them. Every shared structure in partvisor is left consistent at each
//!   statement that can panic (the release profile aborts on panic anyway),
//!   so a poisoned lock carries no information worth stopping for.
//!
//! - [`inherited`]: files handed over as inherited descriptors named
//!   `/proc/self/fd/N`, used as they were opened, never reopened.
//! - [`peer`]: the uid at the other end of a Unix socket (`SO_PEERCRED`).
//! - [`ci`]: what a test does when its environment is missing (fail under
//!   `CI=true`, except for the documented list of things CI machines
//!   cannot have).
//!
//! It lives in `resources/` beside the API crate because it is a shared
//! support library, not one of the card's components.
//!
//! ## What it must never do
//! - Hold policy or state of its own, or do I/O beyond writing logs to
//!   stderr and reading the files it is asked to open.

pub mod ci;
pub mod inherited;
pub mod peer;
pub mod ratelimit;
pub mod sync;

use std::io::IsTerminal;

/// The environment variable every partvisor binary reads its log filter from.
pub const LOG_ENV: &str = "PARTVISOR_LOG";

/// Sets up `tracing` for a partvisor process: stderr, [`LOG_ENV`] filter
/// (default `info`), no module targets in the lines. A filter that does not
/// parse is reported on stderr and the default is used, so a typo in the
/// variable never silences a daemon. Calling it twice keeps the first set-up.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var(LOG_ENV) {
        Err(_) => EnvFilter::new("info"),
        Ok(text) => match EnvFilter::try_new(&text) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{LOG_ENV}={text:?} is not a tracing filter ({e}); logging at info");
                EnvFilter::new("info")
            }
        },
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(ratelimit::CappedStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}
