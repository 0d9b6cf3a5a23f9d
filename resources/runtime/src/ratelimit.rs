//! Bounded logging: a rate limit for each kind of line that a guest, a
//! vhost-user frontend or a peer can cause at will, and a cap on what a
//! process writes to its log at all.
//!
//! A [`Limiter`] lets a burst of lines through per window and counts the
//! rest; the next line that gets through carries the count of those
//! suppressed since the last one, so nothing is hidden, only summarised.
//! The cap ([`LOG_CAP_ENV`], default [`DEFAULT_LOG_CAP`]) bounds the bytes a
//! process writes through [`init_logging`](crate::init_logging): after it,
//! one line says so and the rest are dropped, so no guest can fill the
//! host's disk through its monitor's log.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lets `burst` lines through per `window`, counts the rest.
#[derive(Debug)]
pub struct Limiter {
    burst: u32,
    window_ms: u64,
    window_start: AtomicU64,
    in_window: AtomicU32,
    suppressed: AtomicU64,
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let ms = START.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

impl Limiter {
    /// A limiter for one kind of line (usually a `static`).
    pub const fn new(burst: u32, window: Duration) -> Limiter {
        Limiter {
            burst,
            window_ms: window.as_millis() as u64,
            window_start: AtomicU64::new(0),
            in_window: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log this line, saying that `n` like it were suppressed
    /// since the last one logged; `None`: it is counted, stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= self.window_ms
            && self
                .window_start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The text to append to a line `Limiter::allow` let through with `n`.
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it suppressed)")
    }
}

/// The environment variable with the most bytes a process logs.
pub const LOG_CAP_ENV: &str = "PARTVISOR_LOG_MAX_BYTES";
/// Default log cap: 64 MiB per process.
pub const DEFAULT_LOG_CAP: u64 = 64 << 20;

/// Bytes written so far and whether the cap's notice was written.
static WRITTEN: AtomicU64 = AtomicU64::new(0);
static CAPPED: AtomicBool = AtomicBool::new(false);

fn cap() -> u64 {
    static CAP: OnceLock<u64> = OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var(LOG_CAP_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_LOG_CAP)
    })
}

/// stderr, until the process has written its cap.
#[derive(Clone, Copy, Debug, Default)]
pub struct CappedStderr;

impl std::io::Write for CappedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let before = WRITTEN.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if before + buf.len() as u64 <= cap() {
            std::io::stderr().write_all(buf)?;
        } else if !CAPPED.swap(true, Ordering::Relaxed) {
            let note = format!(
                "log cap of {} bytes reached ({LOG_CAP_ENV}); further lines are dropped\n",
                cap()
            );
            std::io::stderr().write_all(note.as_bytes())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CappedStderr {
    type Writer = CappedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        CappedStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_gets_through_and_the_rest_is_counted_into_the_next_window() {
        let l = Limiter::new(3, Duration::from_millis(200));
        let got: Vec<Option<u64>> = (0..10).map(|_| l.allow()).collect();
        assert_eq!(&got[..3], &[Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none), "{got:?}");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.allow(), Some(7), "the next line reports the 7 suppressed");
        assert_eq!(l.allow(), Some(0));
        assert_eq!(suppressed_note(7), " (7 more like it suppressed)");
        assert_eq!(suppressed_note(0), "");
    }
}
