use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ChannelError, RingConsumer};

/// An eventfd used as a doorbell: the producer writes it, the consumer blocks
/// on it.
#[derive(Debug)]
pub struct Doorbell {
    efd: EventFd,
}

impl Doorbell {
    /// Creates a non-blocking eventfd doorbell.
    pub fn new() -> Result<Self, ChannelError> {
        let efd = EventFd::new(EFD_NONBLOCK).map_err(|source| ChannelError::Os {
            op: "eventfd",
            source,
        })?;
        Ok(Doorbell { efd })
    }

    /// Wraps an fd received from a peer after checking that it really is an
    /// eventfd (a pipe could block our writer forever) and making it
    /// non-blocking.
    pub fn from_received(fd: OwnedFd) -> Result<Self, ChannelError> {
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| {
                ChannelError::Os {
                    op: "readlink(/proc/self/fd)",
                    source,
                }
            })?;
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(ChannelError::Protocol("doorbell fd is not an eventfd"));
        }
        // SAFETY: F_GETFL/F_SETFL on a valid fd only change its status flags.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(ChannelError::os("fcntl(O_NONBLOCK)"));
            }
        }
        // SAFETY: fd is an owned eventfd whose ownership moves into EventFd.
        let efd = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
        Ok(Doorbell { efd })
    }

    /// Rings the bell. A full counter (EAGAIN) already means "wake up".
    pub fn notify(&self) -> Result<(), ChannelError> {
        match self.efd.write(1) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(source) => Err(ChannelError::Os {
                op: "eventfd write",
                source,
            }),
        }
    }

    /// Clears pending rings; returns how many there were.
    pub fn drain(&self) -> u64 {
        self.efd.read().unwrap_or(0)
    }

    /// The fd, to send to the producer or to poll on.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by self.efd, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.efd.as_raw_fd()) }
    }
}

/// How a [`Waiter::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The condition became true while spinning (no system call made).
    Spun,
    /// The condition became true and we blocked on the doorbell first.
    Woken,
    /// The extra fd (e.g. the peer's control socket) became readable or hung up.
    Extra,
    /// Timed out.
    TimedOut,
}

/// Adaptive spin-then-block wait on a ring's doorbell.
///
/// The spin budget doubles every time spinning found work. When the waiter
/// had to block, it looks at how long the message actually took: if
/// spinning that long (twice, for margin) fits under `max_spin`, the budget
/// grows to it; otherwise it halves (never below `max_spin / 64`). A channel
/// with back-to-back traffic stays on the polling fast path, an idle one
/// costs no CPU.
#[derive(Debug)]
pub struct Waiter {
    spin: Duration,
    max_spin: Duration,
}

impl Waiter {
    /// A waiter that spins at most `max_spin` before blocking.
    pub fn new(max_spin: Duration) -> Self {
        Waiter {
            spin: max_spin / 4,
            max_spin,
        }
    }

    fn grow(&mut self) {
        self.spin = (self.spin * 2 + Duration::from_micros(1)).min(self.max_spin);
    }

    /// Current spin budget.
    pub fn spin_budget(&self) -> Duration {
        self.spin
    }

    /// Waits until `ready()` is true, one of `fds` is readable, or `timeout`.
    ///
    /// `arm(true)` must raise the flag the producer checks before ringing
    /// the doorbell (e.g. [`RingConsumer::set_sleeping`]); `arm(false)`
    /// lowers it. After arming, `ready()` is checked once more before
    /// blocking, so a message published between the last spin and the arming
    /// is never missed. `fds[0]` is conventionally the doorbell, which is
    /// drained after waking.
    pub fn wait(
        &mut self,
        mut ready: impl FnMut() -> bool,
        mut arm: impl FnMut(bool),
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<WaitOutcome, ChannelError> {
        let start = Instant::now();
        loop {
            if ready() {
                self.grow();
                return Ok(WaitOutcome::Spun);
            }
            if start.elapsed() >= self.spin {
                break;
            }
            std::hint::spin_loop();
        }
        arm(true);
        if ready() {
            // Arrived while arming: still no system call made.
            arm(false);
            self.grow();
            return Ok(WaitOutcome::Spun);
        }
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let remaining = timeout.saturating_sub(start.elapsed());
        let ms = i32::try_from(remaining.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        arm(false);
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(WaitOutcome::TimedOut);
            }
            return Err(ChannelError::Os {
                op: "poll",
                source: e,
            });
        }
        if let Some(first) = pfds.first() {
            if first.revents != 0 {
                drain_fd(first.fd);
            }
        }
        if pfds.iter().skip(1).any(|p| p.revents != 0) {
            self.shrink();
            return Ok(WaitOutcome::Extra);
        }
        if rc == 0 {
            self.shrink();
            return Ok(WaitOutcome::TimedOut);
        }
        // Had we spun for `waited`, we would have caught this message without
        // a system call: if that is within the cap, spin that long next time;
        // otherwise blocking was the right call, spin less.
        let waited = start.elapsed();
        if waited < self.max_spin {
            self.spin = (waited * 2).clamp(self.spin, self.max_spin);
        } else {
            self.shrink();
        }
        Ok(WaitOutcome::Woken)
    }

    fn shrink(&mut self) {
        self.spin = (self.spin / 2).max(self.max_spin / 64);
    }
}

fn drain_fd(fd: i32) {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a local u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Convenience for the common case: wait on one ring and its doorbell.
pub fn wait_ring(
    waiter: &mut Waiter,
    ring: &std::cell::RefCell<RingConsumer>,
    bell: &Doorbell,
    timeout: Duration,
) -> Result<WaitOutcome, ChannelError> {
    waiter.wait(
        || ring.borrow_mut().has_data().unwrap_or(true),
        |s| ring.borrow().set_sleeping(s),
        &[bell.fd()],
        timeout,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RingGeometry, RingProducer};
    use std::sync::Arc;

    #[test]
    fn blocked_consumer_is_woken_by_producer_that_sees_the_flag() {
        let geo = RingGeometry {
            slots: 8,
            slot_size: 32,
        };
        let map = Arc::new(geo.create("db").unwrap().map(true).unwrap());
        let mut prod = RingProducer::new(map.clone(), geo).unwrap();
        let cons = std::cell::RefCell::new(RingConsumer::new(map, geo).unwrap());
        let bell = Arc::new(Doorbell::new().unwrap());
        let bell2 = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            prod.try_push(b"wake").unwrap();
            let slept = prod.consumer_sleeping();
            if slept {
                bell2.notify().unwrap();
            }
            slept
        });
        let mut w = Waiter::new(Duration::from_micros(10));
        let start = Instant::now();
        let out = wait_ring(&mut w, &cons, &bell, Duration::from_secs(10)).unwrap();
        let producer_saw_sleeper = t.join().unwrap();
        assert_eq!(out, WaitOutcome::Woken);
        assert!(
            producer_saw_sleeper,
            "consumer blocked, so the producer must have seen the flag"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "woken by the bell, not the timeout"
        );
        let mut buf = [0u8; 28];
        assert_eq!(cons.borrow_mut().try_pop(&mut buf).unwrap(), Some(4));
    }

    #[test]
    fn wait_times_out_when_nothing_arrives() {
        let geo = RingGeometry {
            slots: 2,
            slot_size: 16,
        };
        let map = Arc::new(geo.create("t").unwrap().map(true).unwrap());
        let cons = RingConsumer::new(map, geo).unwrap();
        let bell = Doorbell::new().unwrap();
        let mut w = Waiter::new(Duration::from_micros(50));
        let start = Instant::now();
        let out = w
            .wait(
                || false,
                |s| cons.set_sleeping(s),
                &[bell.fd()],
                Duration::from_millis(30),
            )
            .unwrap();
        assert_eq!(out, WaitOutcome::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(25));
        assert!(
            w.spin_budget() < Duration::from_micros(50),
            "blocking must shrink the spin budget"
        );
    }

    #[test]
    fn a_message_that_arrives_soon_after_blocking_grows_the_spin_budget() {
        let geo = RingGeometry {
            slots: 8,
            slot_size: 32,
        };
        let map = Arc::new(geo.create("grow").unwrap().map(true).unwrap());
        let mut prod = RingProducer::new(map.clone(), geo).unwrap();
        let cons = std::cell::RefCell::new(RingConsumer::new(map, geo).unwrap());
        let bell = Arc::new(Doorbell::new().unwrap());
        let mut w = Waiter::new(Duration::from_millis(20));
        // Idle periods (timeouts) shrink the budget to its floor.
        for _ in 0..8 {
            let out = wait_ring(&mut w, &cons, &bell, Duration::from_millis(25)).unwrap();
            assert_eq!(out, WaitOutcome::TimedOut);
        }
        let floor = w.spin_budget();
        assert_eq!(floor, Duration::from_millis(20) / 64);
        // A message 2 ms later: blocking was unnecessary, so spin longer next time.
        let bell2 = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            prod.try_push(b"late").unwrap();
            if prod.consumer_sleeping() {
                bell2.notify().unwrap();
            }
        });
        let out = wait_ring(&mut w, &cons, &bell, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(out, WaitOutcome::Woken);
        assert!(
            w.spin_budget() >= Duration::from_millis(2),
            "budget {:?} did not grow from {floor:?}",
            w.spin_budget()
        );
    }

    #[test]
    fn non_eventfd_is_refused_as_doorbell() {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid 2-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are fresh and owned here.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert!(matches!(
            Doorbell::from_received(r),
            Err(ChannelError::Protocol(_))
        ));
    }
}
