//! Completion queues: a bounded queue of work completions (overflow is
//! sticky and reported), notification armed once like `ibv_req_notify_cq`
//! (eventfd plus optional callback, run with no lock held), and polling,
//! which also drives progress on the QPs feeding the queue.
use partvisor_runtime::sync::MutexExt;
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use channels::Doorbell;

use super::context::CtxInner;
use super::qp::QpInner;
use super::{now_ns, poll_fds};
use crate::types::*;
use crate::{IcError, Result};

type Callback = Arc<dyn Fn() + Send + Sync>;

pub(crate) struct CqInner {
    pub(super) ctx: Weak<CtxInner>,
    pub(super) depth: usize,
    pub(super) q: Mutex<VecDeque<WorkCompletion>>,
    pub(super) overflow: AtomicBool,
    pub(super) armed: AtomicBool,
    pub(super) fire_pending: AtomicBool,
    pub(super) bell: Doorbell,
    pub(super) callback: Mutex<Option<Callback>>,
    pub(super) qps: Mutex<Vec<Weak<QpInner>>>,
    pub(super) users: AtomicUsize,
    pub(super) dead: AtomicBool,
}

impl CqInner {
    pub(super) fn push(&self, wc: WorkCompletion) {
        {
            let mut q = self.q.locked();
            if q.len() >= self.depth {
                self.overflow.store(true, Ordering::Release);
                return;
            }
            q.push_back(wc);
        }
        if self.armed.swap(false, Ordering::AcqRel) {
            // Fired later, by `notify_pending`, once no lock is held: the
            // callback may poll this CQ or post to the QP.
            self.fire_pending.store(true, Ordering::Release);
        }
    }

    /// Runs an armed notification that became due. Called with no lock held.
    pub(super) fn notify_pending(&self) {
        if self.fire_pending.swap(false, Ordering::AcqRel) {
            self.fire();
        }
    }

    /// Runs the callback, then rings the eventfd (so a waiter woken by the
    /// eventfd sees the callback's effects). A notification that becomes due
    /// while a callback runs on this thread (the callback re-armed and more
    /// completions arrived) runs after it returns, in a loop, not nested:
    /// the stack stays flat however long a callback keeps re-arming.
    fn fire(&self) {
        thread_local!(static IN_CALLBACK: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) });
        let me = self as *const CqInner as usize;
        if IN_CALLBACK.with(|c| c.borrow().contains(&me)) {
            self.fire_pending.store(true, Ordering::Release);
            return;
        }
        IN_CALLBACK.with(|c| c.borrow_mut().push(me));
        loop {
            let cb = self.callback.locked().clone();
            if let Some(cb) = cb {
                cb();
            }
            let _ = self.bell.notify();
            if !self.fire_pending.swap(false, Ordering::AcqRel) {
                break;
            }
        }
        IN_CALLBACK.with(|c| c.borrow_mut().retain(|&p| p != me));
    }
}

/// A completion queue.
#[derive(Clone)]
pub struct Cq {
    pub(super) inner: Arc<CqInner>,
}

impl Cq {
    /// Drives progress on the QPs feeding this CQ, then takes up to `max`
    /// completions.
    pub fn poll(&self, max: usize) -> Result<Vec<WorkCompletion>> {
        let mut out = Vec::new();
        self.poll_into(&mut out, max)?;
        Ok(out)
    }

    /// Like [`Cq::poll`] but appends to `out` (no allocation on the fast path).
    pub fn poll_into(&self, out: &mut Vec<WorkCompletion>, max: usize) -> Result<usize> {
        if self.inner.overflow.load(Ordering::Acquire) {
            return Err(IcError::CqOverflow);
        }
        let deadline = now_ns() + 2_000_000;
        // Not under the list lock: progress may run the notification
        // callback, which may poll this CQ again.
        // (Up to four QPs without allocating: the polling fast path.)
        let mut few: [Option<Arc<QpInner>>; 4] = Default::default();
        let mut more = Vec::new();
        for (i, qp) in self
            .inner
            .qps
            .locked()
            .iter()
            .filter_map(Weak::upgrade)
            .enumerate()
        {
            match few.get_mut(i) {
                Some(slot) => *slot = Some(qp),
                None => more.push(qp),
            }
        }
        for qp in few.iter().flatten().chain(more.iter()) {
            qp.app_poll_deadline.store(deadline, Ordering::Relaxed);
            qp.try_progress();
        }
        self.inner.notify_pending();
        let mut q = self.inner.q.locked();
        let n = max.min(q.len());
        out.extend(q.drain(..n));
        Ok(n)
    }

    /// Arms the notification: the next completion added rings the CQ's
    /// eventfd ([`Cq::notify_fd`]) and calls the callback, once.
    pub fn req_notify(&self) {
        self.inner.armed.store(true, Ordering::Release);
        // A completion that is already queued counts: fire at once.
        let pending = !self.inner.q.locked().is_empty();
        if pending && self.inner.armed.swap(false, Ordering::AcqRel) {
            self.inner.fire();
        }
    }

    /// Sets the function called when an armed notification fires: from the
    /// progress engine's thread, or from inside a `poll`/`post_*` call that
    /// made progress. It runs with no interconnect lock held, so it may poll
    /// this CQ, re-arm it and post work requests.
    pub fn set_callback(&self, cb: impl Fn() + Send + Sync + 'static) {
        *self.inner.callback.locked() = Some(Arc::new(cb));
    }

    /// The eventfd that becomes readable when an armed notification fires.
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.inner.bell.fd()
    }

    /// Blocks until an armed notification fires or `timeout`; true if it fired.
    pub fn wait_notify(&self, timeout: Duration) -> bool {
        let fired = poll_fds(&[self.inner.bell.fd().as_raw_fd()], timeout);
        if fired {
            self.inner.bell.drain();
        }
        fired
    }

    /// Destroys the CQ; busy while a QP uses it.
    pub fn destroy(&self) -> Result<()> {
        let users = self.inner.users.load(Ordering::Acquire);
        if users > 0 {
            return Err(IcError::Busy {
                what: "completion queue",
                detail: format!("{users} queue pair attachments"),
            });
        }
        if !self.inner.dead.swap(true, Ordering::AcqRel) {
            if let Some(c) = self.inner.ctx.upgrade() {
                c.cqs.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl AsFd for Cq {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.notify_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::ctx;
    use super::super::QpCaps;
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn wc(wr_id: u64) -> WorkCompletion {
        WorkCompletion {
            wr_id,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: 8,
            imm: None,
            qp_num: 1,
        }
    }

    /// A CQ whose callback counts its calls.
    fn counted(depth: usize) -> (crate::Context, Cq, Arc<AtomicU32>) {
        let c = ctx("a");
        let cq = c.create_cq(depth).unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let n = calls.clone();
        cq.set_callback(move || {
            n.fetch_add(1, Ordering::SeqCst);
        });
        (c, cq, calls)
    }

    fn wr_ids(wcs: &[WorkCompletion]) -> Vec<u64> {
        wcs.iter().map(|w| w.wr_id).collect()
    }

    #[test]
    fn poll_returns_completions_in_arrival_order_and_at_most_max() {
        let c = ctx("a");
        let cq = c.create_cq(8).unwrap();
        for id in 1..=5 {
            cq.inner.push(wc(id));
        }
        assert_eq!(wr_ids(&cq.poll(2).unwrap()), [1, 2]);
        let mut out = vec![wc(99)];
        assert_eq!(cq.poll_into(&mut out, 16).unwrap(), 3);
        assert_eq!(wr_ids(&out), [99, 3, 4, 5], "poll_into appends");
        assert!(cq.poll(16).unwrap().is_empty());
        assert_eq!(cq.poll(0).unwrap(), []);
    }

    #[test]
    fn overflow_drops_the_extra_completion_and_stays_reported() {
        let c = ctx("a");
        let cq = c.create_cq(2).unwrap();
        for id in 1..=3 {
            cq.inner.push(wc(id));
        }
        assert_eq!(
            wr_ids(&cq.inner.q.locked().iter().cloned().collect::<Vec<_>>()),
            [1, 2]
        );
        assert!(matches!(cq.poll(4), Err(IcError::CqOverflow)));
        assert!(matches!(cq.poll(4), Err(IcError::CqOverflow)), "sticky");
    }

    #[test]
    fn create_cq_refuses_zero_and_more_than_a_million_entries() {
        let c = ctx("a");
        for depth in [0, (1 << 20) + 1] {
            assert!(matches!(
                c.create_cq(depth),
                Err(IcError::InvalidArgument(_))
            ));
        }
        assert_eq!(c.create_cq(1 << 20).unwrap().inner.depth, 1 << 20);
        assert_eq!(c.query().cqs, 1);
    }

    #[test]
    fn an_unarmed_cq_never_notifies() {
        let (_c, cq, calls) = counted(8);
        cq.inner.push(wc(1));
        cq.inner.notify_pending();
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert!(!cq.wait_notify(Duration::from_millis(10)));
    }

    #[test]
    fn an_armed_notification_fires_once_for_several_completions() {
        let (_c, cq, calls) = counted(8);
        cq.req_notify();
        cq.inner.push(wc(1));
        cq.inner.push(wc(2));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "deferred until no lock is held"
        );
        cq.inner.notify_pending();
        cq.inner.notify_pending();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cq.wait_notify(Duration::ZERO), "the eventfd rang");
        assert!(!cq.wait_notify(Duration::ZERO), "and was drained");
        cq.inner.push(wc(3));
        cq.inner.notify_pending();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one shot per arming");
        assert_eq!(wr_ids(&cq.poll(8).unwrap()), [1, 2, 3]);
    }

    #[test]
    fn arming_with_completions_already_queued_fires_at_once() {
        let (_c, cq, calls) = counted(8);
        cq.inner.push(wc(1));
        cq.req_notify();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cq.wait_notify(Duration::ZERO));
        cq.inner.push(wc(2));
        cq.inner.notify_pending();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "that firing used the arming"
        );
        cq.req_notify();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "re-armed with two queued");
    }

    #[test]
    fn a_callback_that_rearms_runs_again_in_a_loop_not_nested() {
        let c = ctx("a");
        let cq = c.create_cq(8).unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let depth = Arc::new(AtomicU32::new(0));
        let max_depth = Arc::new(AtomicU32::new(0));
        let (cq2, n, d, md) = (cq.clone(), calls.clone(), depth.clone(), max_depth.clone());
        cq.set_callback(move || {
            let now = d.fetch_add(1, Ordering::SeqCst) + 1;
            md.fetch_max(now, Ordering::SeqCst);
            if n.fetch_add(1, Ordering::SeqCst) < 2 {
                // Queue one more and re-arm: due at once, from inside.
                cq2.inner.push(wc(10));
                cq2.req_notify();
            }
            d.fetch_sub(1, Ordering::SeqCst);
        });
        cq.inner.push(wc(1));
        cq.req_notify();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(max_depth.load(Ordering::SeqCst), 1);
        assert_eq!(cq.poll(8).unwrap().len(), 3);
        cq.set_callback(|| {}); // the old closure owned the CQ: release it
    }

    #[test]
    fn destroy_is_refused_while_a_qp_uses_the_cq_and_counts_once() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let (cq, other) = (c.create_cq(8).unwrap(), c.create_cq(8).unwrap());
        let qp = c.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
        match cq.destroy() {
            Err(IcError::Busy { what, detail }) => {
                assert_eq!(what, "completion queue");
                assert_eq!(detail, "2 queue pair attachments", "send and receive");
            }
            other => panic!("{other:?}"),
        }
        other.destroy().unwrap();
        assert_eq!(c.query().cqs, 1);
        drop(qp);
        cq.destroy().unwrap();
        cq.destroy().unwrap();
        assert_eq!(c.query().cqs, 0, "a second destroy does not count again");
        assert!(matches!(
            c.create_qp(&pd, &cq, &cq, QpCaps::default()),
            Err(IcError::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_cq_fd_is_its_notification_eventfd() {
        let c = ctx("a");
        let cq = c.create_cq(4).unwrap();
        assert_eq!(cq.as_fd().as_raw_fd(), cq.notify_fd().as_raw_fd());
    }
}
