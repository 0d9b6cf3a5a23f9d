//! Protection domains and memory regions: registration, the lkey/rkey
//! tables, the access-flag and bounds checks every copy goes through, and
//! deregistration (which revokes access the moment it returns).
use partvisor_runtime::sync::RwLockExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};

use channels::Mapping;

use super::context::CtxInner;
use super::random_u32;
use crate::alloc::Buffer;
use crate::types::*;
use crate::{IcError, Result};

#[derive(Default)]
pub(super) struct MrTables {
    pub(super) by_lkey: HashMap<u32, Arc<MrInner>>,
    pub(super) by_rkey: HashMap<u32, Arc<MrInner>>,
}

pub(crate) struct PdInner {
    pub(super) id: u32,
    pub(super) ctx: Weak<CtxInner>,
    pub(super) mrs: RwLock<MrTables>,
    pub(super) live_qps: AtomicUsize,
    pub(super) dead: AtomicBool,
}

/// A protection domain: memory regions are reachable only through QPs of
/// the same PD.
#[derive(Clone)]
pub struct Pd {
    pub(super) inner: Arc<PdInner>,
}

pub(crate) struct MrInner {
    pub(super) lkey: u32,
    pub(super) rkey: u32,
    pub(super) buf: Buffer,
    pub(super) off: u64,
    pub(super) len: u64,
    pub(super) access: Access,
    /// false once deregistered; writers of the memory hold the read lock,
    /// deregistration takes the write lock, so it waits out in-flight copies.
    pub(super) valid: RwLock<bool>,
}

/// A registered memory region.
#[derive(Clone)]
pub struct Mr {
    pub(super) inner: Arc<MrInner>,
    pub(super) pd: Arc<PdInner>,
}

impl Mr {
    /// Local key, used in [`Sge::lkey`].
    pub fn lkey(&self) -> u32 {
        self.inner.lkey
    }
    /// Remote key, handed to peers allowed remote access.
    pub fn rkey(&self) -> u32 {
        self.inner.rkey
    }
    /// Length of the region.
    pub fn len(&self) -> u64 {
        self.inner.len
    }
    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// Access rights.
    pub fn access(&self) -> Access {
        self.inner.access
    }
    /// A scatter entry for `len` bytes at `offset` of this region.
    pub fn sge(&self, offset: u64, len: u64) -> Sge {
        Sge {
            lkey: self.inner.lkey,
            offset,
            len,
        }
    }
    /// Remote address of `offset` in this region.
    pub fn remote(&self, offset: u64) -> RemoteAddr {
        RemoteAddr {
            rkey: self.inner.rkey,
            offset,
        }
    }
    /// Deregisters: from the moment this returns, no local or remote
    /// operation can touch the region (in-flight copies are waited out).
    pub fn deregister(&self) -> Result<()> {
        let mut v = self.inner.valid.write_locked();
        if !*v {
            return Err(IcError::InvalidArgument(
                "memory region already deregistered".into(),
            ));
        }
        *v = false;
        let mut t = self.pd.mrs.write_locked();
        t.by_lkey.remove(&self.inner.lkey);
        t.by_rkey.remove(&self.inner.rkey);
        Ok(())
    }
}

impl Pd {
    /// Allocates a registrable buffer of at least `len` bytes from the
    /// interconnect's allocator (a sealed memfd of its own).
    pub fn alloc_buffer(&self, len: u64) -> Result<Buffer> {
        self.check()?;
        Buffer::allocate(len)
    }

    fn check(&self) -> Result<()> {
        if self
            .inner
            .ctx
            .upgrade()
            .is_none_or(|c| c.closed.load(Ordering::Acquire))
        {
            return Err(IcError::Closed);
        }
        if self.inner.dead.load(Ordering::Acquire) {
            return Err(IcError::InvalidArgument(
                "protection domain was deallocated".into(),
            ));
        }
        Ok(())
    }

    /// Registers `len` bytes at `offset` of `buf` with `access`.
    pub fn reg_mr(&self, buf: &Buffer, offset: u64, len: u64, access: Access) -> Result<Mr> {
        self.check()?;
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > buf.len()) {
            return Err(IcError::InvalidArgument(format!(
                "region [{offset}, +{len}) is not inside the {}-byte buffer",
                buf.len()
            )));
        }
        let mut t = self.inner.mrs.write_locked();
        let key = || loop {
            let k = random_u32();
            if k != 0 && !t.by_lkey.contains_key(&k) && !t.by_rkey.contains_key(&k) {
                break k;
            }
        };
        let lkey = key();
        let mut rkey = key();
        while rkey == lkey {
            rkey = key();
        }
        let inner = Arc::new(MrInner {
            lkey,
            rkey,
            buf: buf.clone(),
            off: offset,
            len,
            access,
            valid: RwLock::new(true),
        });
        t.by_lkey.insert(lkey, inner.clone());
        t.by_rkey.insert(rkey, inner.clone());
        Ok(Mr {
            inner,
            pd: self.inner.clone(),
        })
    }

    /// Deallocates the PD. Fails with [`IcError::Busy`] while memory regions
    /// or queue pairs still use it.
    pub fn dealloc(&self) -> Result<()> {
        let t = self.inner.mrs.read_locked();
        let mrs = t.by_lkey.len();
        let qps = self.inner.live_qps.load(Ordering::Acquire);
        if mrs > 0 || qps > 0 {
            return Err(IcError::Busy {
                what: "protection domain",
                detail: format!("{mrs} memory regions and {qps} queue pairs"),
            });
        }
        if !self.inner.dead.swap(true, Ordering::AcqRel) {
            if let Some(c) = self.inner.ctx.upgrade() {
                c.pds.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Identifier, for logs.
    pub fn id(&self) -> u32 {
        self.inner.id
    }
}

impl PdInner {
    pub(super) fn lookup(&self, key: u32, remote: bool) -> Option<Arc<MrInner>> {
        let t = self.mrs.read_locked();
        if remote {
            t.by_rkey.get(&key)
        } else {
            t.by_lkey.get(&key)
        }
        .cloned()
    }
}

/// Runs `f` on the mapping slice `[mr.off+off, +len)` if the region is still
/// registered, holds `need`, and contains the range.
pub(super) fn with_mr<R>(
    mr: &MrInner,
    off: u64,
    len: u64,
    need: Access,
    f: impl FnOnce(&Mapping, u64) -> R,
) -> Option<R> {
    let valid = mr.valid.read_locked();
    if !*valid || !mr.access.contains(need) || off.checked_add(len).is_none_or(|e| e > mr.len) {
        return None;
    }
    Some(f(mr.buf.map(), mr.off + off))
}

#[cfg(test)]
mod tests {
    use super::super::testing::ctx;
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn reg_mr_accepts_exact_fits_and_refuses_empty_overflowing_or_outside_ranges() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        let l = buf.len();
        assert_eq!(pd.reg_mr(&buf, 0, l, Access::NONE).unwrap().len(), l);
        assert_eq!(pd.reg_mr(&buf, l - 1, 1, Access::NONE).unwrap().len(), 1);
        for (off, len) in [(0, 0), (1, l), (l, 1), (u64::MAX, 2), (2, u64::MAX)] {
            assert!(
                matches!(
                    pd.reg_mr(&buf, off, len, Access::NONE),
                    Err(IcError::InvalidArgument(_))
                ),
                "[{off}, +{len}) of a {l}-byte buffer"
            );
        }
    }

    #[test]
    fn a_region_reports_its_keys_length_access_and_addresses() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(8192).unwrap();
        let access = Access::LOCAL_WRITE | Access::REMOTE_READ;
        let mr = pd.reg_mr(&buf, 4096, 1000, access).unwrap();
        assert_eq!(
            (mr.len(), mr.is_empty(), mr.access()),
            (1000, false, access)
        );
        assert_eq!(
            mr.sge(8, 16),
            Sge {
                lkey: mr.lkey(),
                offset: 8,
                len: 16
            }
        );
        assert_eq!(
            mr.remote(4),
            RemoteAddr {
                rkey: mr.rkey(),
                offset: 4
            }
        );
    }

    #[test]
    fn lkeys_are_found_only_locally_and_rkeys_only_remotely() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        let mr = pd.reg_mr(&buf, 0, 4096, Access::REMOTE_WRITE).unwrap();
        assert_ne!(mr.lkey(), 0);
        assert_ne!(mr.rkey(), 0);
        assert_ne!(mr.lkey(), mr.rkey());
        let by_lkey = pd.inner.lookup(mr.lkey(), false).unwrap();
        assert_eq!(by_lkey.rkey, mr.rkey());
        assert_eq!(pd.inner.lookup(mr.rkey(), true).unwrap().lkey, mr.lkey());
        assert!(pd.inner.lookup(mr.lkey(), true).is_none());
        assert!(pd.inner.lookup(mr.rkey(), false).is_none());
    }

    #[test]
    fn keys_of_one_pd_are_unknown_to_another() {
        let c = ctx("a");
        let (pd1, pd2) = (c.alloc_pd().unwrap(), c.alloc_pd().unwrap());
        assert_ne!(pd1.id(), pd2.id());
        let buf = pd1.alloc_buffer(4096).unwrap();
        let mr = pd1.reg_mr(&buf, 0, 4096, Access::REMOTE_READ).unwrap();
        assert!(pd2.inner.lookup(mr.rkey(), true).is_none());
        assert!(pd2.inner.lookup(mr.lkey(), false).is_none());
    }

    #[test]
    fn lookups_fail_after_deregistration_and_a_region_already_held_is_revoked() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        let mr = pd.reg_mr(&buf, 0, 4096, Access::REMOTE_WRITE).unwrap();
        let held = pd.inner.lookup(mr.rkey(), true).unwrap();
        assert_eq!(
            with_mr(&held, 0, 16, Access::REMOTE_WRITE, |_, o| o),
            Some(0)
        );
        mr.deregister().unwrap();
        assert!(pd.inner.lookup(mr.rkey(), true).is_none());
        assert!(pd.inner.lookup(mr.lkey(), false).is_none());
        assert_eq!(with_mr(&held, 0, 16, Access::REMOTE_WRITE, |_, o| o), None);
        assert!(matches!(mr.deregister(), Err(IcError::InvalidArgument(_))));
    }

    #[test]
    fn with_mr_needs_every_requested_flag_and_the_range_inside_the_region() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        let mr = pd
            .reg_mr(&buf, 100, 200, Access::LOCAL_WRITE | Access::REMOTE_READ)
            .unwrap();
        let m = &mr.inner;
        let at = |off, len, need| with_mr(m, off, len, need, |_, base| base);
        // The closure gets the offset in the buffer, not in the region.
        assert_eq!(at(0, 200, Access::REMOTE_READ), Some(100));
        assert_eq!(at(50, 10, Access::LOCAL_WRITE), Some(150));
        assert_eq!(
            at(0, 1, Access::LOCAL_WRITE | Access::REMOTE_READ),
            Some(100)
        );
        assert_eq!(at(200, 0, Access::NONE), Some(300));
        assert_eq!(at(0, 1, Access::REMOTE_WRITE), None);
        assert_eq!(at(0, 1, Access::REMOTE_READ | Access::REMOTE_WRITE), None);
        assert_eq!(at(1, 200, Access::NONE), None);
        assert_eq!(at(201, 0, Access::NONE), None);
        assert_eq!(at(u64::MAX, 2, Access::NONE), None);
    }

    #[test]
    fn deregistration_waits_for_a_copy_in_flight() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        let mr = pd.reg_mr(&buf, 0, 4096, Access::REMOTE_WRITE).unwrap();
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let held = mr.inner.clone();
        let copier = std::thread::spawn(move || {
            with_mr(&held, 0, 8, Access::REMOTE_WRITE, |_, _| {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
        });
        started.recv().unwrap();
        let (done_tx, done) = mpsc::channel();
        let mr2 = mr.clone();
        let deregisterer = std::thread::spawn(move || {
            let r = mr2.deregister();
            done_tx.send(()).unwrap();
            r
        });
        assert!(
            done.recv_timeout(Duration::from_millis(100)).is_err(),
            "deregister returned while a copy was running"
        );
        release.send(()).unwrap();
        assert_eq!(copier.join().unwrap(), Some(()));
        deregisterer.join().unwrap().unwrap();
        assert!(pd.inner.lookup(mr.rkey(), true).is_none());
    }

    #[test]
    fn dealloc_is_refused_while_a_region_is_registered_and_counts_once() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        let mr = pd.reg_mr(&buf, 0, 4096, Access::LOCAL_WRITE).unwrap();
        assert_eq!(c.query().pds, 1);
        match pd.dealloc() {
            Err(IcError::Busy { what, detail }) => {
                assert_eq!(what, "protection domain");
                assert_eq!(detail, "1 memory regions and 0 queue pairs");
            }
            other => panic!("{other:?}"),
        }
        mr.deregister().unwrap();
        pd.dealloc().unwrap();
        pd.dealloc().unwrap();
        assert_eq!(c.query().pds, 0, "a second dealloc does not count again");
        assert!(matches!(
            pd.reg_mr(&buf, 0, 16, Access::NONE),
            Err(IcError::InvalidArgument(_))
        ));
        assert!(matches!(
            pd.alloc_buffer(16),
            Err(IcError::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_closed_access_layer_refuses_buffers_and_registration() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        c.close();
        assert!(matches!(pd.alloc_buffer(16), Err(IcError::Closed)));
        assert!(matches!(
            pd.reg_mr(&buf, 0, 16, Access::NONE),
            Err(IcError::Closed)
        ));
        assert!(matches!(c.alloc_pd(), Err(IcError::Closed)));
    }
}
