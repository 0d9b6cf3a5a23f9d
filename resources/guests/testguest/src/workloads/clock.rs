//! The workloads' clock: the LAPIC one-shot timer, which also bounds every
//! sleep.

use crate::drivers::lapic;

/// Longest single timer arming.
const MAX_ARM_NS: u64 = 1_000_000_000;

/// Monotonic nanoseconds from the LAPIC one-shot timer (1 GHz under KVM),
/// re-armed for each sleep and at least once a second.
pub struct Clock {
    base: u64,
    armed: u64,
}

impl Clock {
    pub fn start() -> Clock {
        lapic::timer_oneshot_ns(MAX_ARM_NS);
        Clock {
            base: 0,
            armed: MAX_ARM_NS,
        }
    }

    /// Nanoseconds since [`Clock::start`]. An expired arming is replaced
    /// by a fresh one (so a busy loop that never sleeps keeps time too; the
    /// time between the expiry and this call is lost, at most one loop).
    pub fn now(&mut self) -> u64 {
        let left = u64::from(lapic::timer_remaining());
        if left == 0 {
            self.base += self.armed;
            self.armed = MAX_ARM_NS;
            lapic::timer_oneshot_ns(MAX_ARM_NS);
            return self.base;
        }
        self.base + self.armed - left.min(self.armed)
    }

    /// Make sure the timer fires by `deadline` (and within a second).
    pub fn arm_until(&mut self, deadline: u64) {
        let now = self.now();
        if deadline < self.base + self.armed {
            let ns = deadline.saturating_sub(now).clamp(1_000, MAX_ARM_NS);
            self.base = now;
            self.armed = ns;
            lapic::timer_oneshot_ns(ns);
        }
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        lapic::timer_oneshot_ns(0);
    }
}
