//! The verbs: access layer, protection domains, memory regions, completion
//! queues and queue pairs, plus the per-QP progress engine that is the same
//! for every transport.
use partvisor_runtime::sync::{MutexExt, RwLockExt};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use channels::{Doorbell, Mapping, Waiter};

use crate::alloc::Buffer;
use crate::directory::{Directory, Endpoint};
use crate::link::{InData, Link, LinkEvent, OutData};
use crate::types::*;
use crate::wire::{Kind, Msg, RESP_WITH_DATA};
use crate::{IcError, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.locked()
}

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

fn now_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Options of an access layer.
#[derive(Debug, Clone)]
pub struct ContextOptions {
    /// Address TCP listeners bind to (port 0 is chosen by the kernel).
    pub tcp_bind: std::net::IpAddr,
    /// Directory for the Unix sockets of shm listeners.
    pub socket_dir: std::path::PathBuf,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            tcp_bind: std::net::Ipv4Addr::LOCALHOST.into(),
            socket_dir: std::env::temp_dir(),
        }
    }
}

/// Attributes returned by [`Context::query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextAttr {
    /// Endpoint name of this partition/process.
    pub name: String,
    /// Host identity used for location transparency.
    pub host_id: String,
    /// Live protection domains.
    pub pds: usize,
    /// Live completion queues.
    pub cqs: usize,
    /// Live queue pairs.
    pub qps: usize,
    /// Largest work request.
    pub max_message: u64,
    /// Largest RDMA READ.
    pub max_read: u64,
}

/// A local port (one per transport).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAttr {
    /// Transport behind the port.
    pub transport: Transport,
    /// Live QPs using it.
    pub active_qps: usize,
}

/// A remote endpoint allowed to reach one of our listeners, or connected now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePort {
    /// Remote endpoint name.
    pub name: String,
    /// Our listener (or QP) it relates to.
    pub local: String,
    /// True if a QP is connected to it now.
    pub connected: bool,
}

pub(crate) struct CtxInner {
    pub name: String,
    pub host_id: String,
    pub directory: Arc<dyn Directory>,
    pub opts: ContextOptions,
    next_qp: AtomicU32,
    next_pd: AtomicU32,
    pds: AtomicUsize,
    cqs: AtomicUsize,
    qps: Mutex<Vec<Weak<QpInner>>>,
    events: Mutex<VecDeque<AsyncEvent>>,
    events_bell: Doorbell,
    pub listeners: Mutex<Vec<(String, Vec<String>)>>,
    closed: AtomicBool,
}

impl CtxInner {
    fn push_event(&self, ev: AsyncEvent) {
        lock(&self.events).push_back(ev);
        let _ = self.events_bell.notify();
    }
}

/// An open access layer: the handle through which a partition uses the
/// interconnect. Cloning shares it.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<CtxInner>,
}

fn read_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

impl Context {
    /// Opens the access layer as endpoint `name`, resolving peers through `directory`.
    pub fn open(
        name: &str,
        directory: Arc<dyn Directory>,
        opts: ContextOptions,
    ) -> Result<Context> {
        if name.is_empty() || name.len() > 200 || name.contains(['/', '\0']) {
            return Err(IcError::InvalidArgument(format!(
                "endpoint name {name:?} must be 1-200 chars without '/'"
            )));
        }
        Ok(Context {
            inner: Arc::new(CtxInner {
                name: name.to_string(),
                host_id: read_host_id(),
                directory,
                opts,
                next_qp: AtomicU32::new(1),
                next_pd: AtomicU32::new(1),
                pds: AtomicUsize::new(0),
                cqs: AtomicUsize::new(0),
                qps: Mutex::new(Vec::new()),
                events: Mutex::new(VecDeque::new()),
                events_bell: Doorbell::new()?,
                listeners: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
            }),
        })
    }

    fn live_qps(&self) -> Vec<Arc<QpInner>> {
        let mut v = lock(&self.inner.qps);
        v.retain(|w| w.strong_count() > 0);
        v.iter()
            .filter_map(Weak::upgrade)
            .filter(|q| !q.destroyed.load(Ordering::Acquire))
            .collect()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(IcError::Closed);
        }
        Ok(())
    }

    /// Endpoint name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Queries the access layer.
    pub fn query(&self) -> ContextAttr {
        ContextAttr {
            name: self.inner.name.clone(),
            host_id: self.inner.host_id.clone(),
            pds: self.inner.pds.load(Ordering::Relaxed),
            cqs: self.inner.cqs.load(Ordering::Relaxed),
            qps: self.live_qps().len(),
            max_message: MAX_MESSAGE,
            max_read: MAX_READ,
        }
    }

    /// Local ports: one per transport.
    pub fn query_ports(&self) -> Vec<PortAttr> {
        let qps = self.live_qps();
        [Transport::Shm, Transport::Tcp]
            .into_iter()
            .map(|t| PortAttr {
                transport: t,
                active_qps: qps.iter().filter(|q| q.transport() == Some(t)).count(),
            })
            .collect()
    }

    /// Remote endpoints allowed to connect to our listeners, and those connected.
    pub fn query_remote_ports(&self) -> Vec<RemotePort> {
        let connected: Vec<String> = self
            .live_qps()
            .iter()
            .filter_map(|q| lock(&q.st).peer.clone())
            .collect();
        let mut out = Vec::new();
        for (local, allow) in lock(&self.inner.listeners).iter() {
            for name in allow {
                out.push(RemotePort {
                    name: name.clone(),
                    local: local.clone(),
                    connected: connected.contains(name),
                });
            }
        }
        out
    }

    /// Allocates a protection domain.
    pub fn alloc_pd(&self) -> Result<Pd> {
        self.check_open()?;
        self.inner.pds.fetch_add(1, Ordering::Relaxed);
        Ok(Pd {
            inner: Arc::new(PdInner {
                id: self.inner.next_pd.fetch_add(1, Ordering::Relaxed),
                ctx: Arc::downgrade(&self.inner),
                mrs: RwLock::new(MrTables::default()),
                live_qps: AtomicUsize::new(0),
                dead: AtomicBool::new(false),
            }),
        })
    }

    /// Creates a completion queue holding up to `depth` completions.
    pub fn create_cq(&self, depth: usize) -> Result<Cq> {
        self.check_open()?;
        if depth == 0 || depth > 1 << 20 {
            return Err(IcError::InvalidArgument(format!(
                "CQ depth {depth} must be in 1..=1048576"
            )));
        }
        self.inner.cqs.fetch_add(1, Ordering::Relaxed);
        Ok(Cq {
            inner: Arc::new(CqInner {
                ctx: Arc::downgrade(&self.inner),
                depth,
                q: Mutex::new(VecDeque::with_capacity(depth.min(4096))),
                overflow: AtomicBool::new(false),
                armed: AtomicBool::new(false),
                fire_pending: AtomicBool::new(false),
                bell: Doorbell::new()?,
                callback: Mutex::new(None),
                qps: Mutex::new(Vec::new()),
                users: AtomicUsize::new(0),
                dead: AtomicBool::new(false),
            }),
        })
    }

    /// Creates a queue pair in the `Init` state. Receives may be posted
    /// before it is connected.
    pub fn create_qp(&self, pd: &Pd, send_cq: &Cq, recv_cq: &Cq, caps: QpCaps) -> Result<Qp> {
        self.check_open()?;
        if pd.inner.dead.load(Ordering::Acquire)
            || send_cq.inner.dead.load(Ordering::Acquire)
            || recv_cq.inner.dead.load(Ordering::Acquire)
        {
            return Err(IcError::InvalidArgument(
                "PD or CQ already destroyed".into(),
            ));
        }
        if caps.max_send_wr == 0
            || caps.max_send_wr > MAX_SEND_WR
            || caps.max_recv_wr == 0
            || caps.max_recv_wr > MAX_RECV_WR
        {
            return Err(IcError::InvalidArgument(format!(
                "QP depth must be 1..={MAX_SEND_WR} send and 1..={MAX_RECV_WR} receive work requests"
            )));
        }
        let qp = Arc::new(QpInner {
            num: self.inner.next_qp.fetch_add(1, Ordering::Relaxed),
            ctx: Arc::downgrade(&self.inner),
            pd: pd.inner.clone(),
            scq: send_cq.inner.clone(),
            rcq: recv_cq.inner.clone(),
            caps,
            st: Mutex::new(QpSt::default()),
            counters: QpCounters::default(),
            app_poll_deadline: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            destroyed: AtomicBool::new(false),
            engine: Mutex::new(None),
            wake: Doorbell::new()?,
        });
        pd.inner.live_qps.fetch_add(1, Ordering::AcqRel);
        for cq in [&send_cq.inner, &recv_cq.inner] {
            cq.users.fetch_add(1, Ordering::AcqRel);
            let mut list = lock(&cq.qps);
            list.retain(|w| {
                w.upgrade()
                    .is_some_and(|q| !q.destroyed.load(Ordering::Acquire))
            });
            list.push(Arc::downgrade(&qp));
        }
        lock(&self.inner.qps).push(Arc::downgrade(&qp));
        Ok(Qp { inner: qp })
    }

    /// Connects `qp` to the endpoint `remote`, resolved through the directory.
    /// `transport: None` picks shm when the peer is on this host, tcp otherwise.
    pub fn connect(
        &self,
        qp: &Qp,
        remote: &str,
        transport: Option<Transport>,
        timeout: Duration,
    ) -> Result<()> {
        self.check_open()?;
        let ep: Endpoint = self.inner.directory.resolve(&self.inner.name, remote)?;
        let t = transport.unwrap_or(
            if ep.host_id == self.inner.host_id && ep.shm_path.is_some() {
                Transport::Shm
            } else {
                Transport::Tcp
            },
        );
        qp.inner.expect_state(QpState::Init)?;
        let hello = crate::connect::Hello {
            from: self.inner.name.clone(),
            to: remote.to_string(),
            transport: t,
        };
        let link: Box<dyn Link> = match t {
            Transport::Shm => {
                let path = ep
                    .shm_path
                    .ok_or_else(|| IcError::Protocol(format!("{remote} has no shm port")))?;
                Box::new(crate::shm::connect(&path, &hello, timeout)?)
            }
            Transport::Tcp => {
                let addr = ep
                    .tcp_addr
                    .ok_or_else(|| IcError::Protocol(format!("{remote} has no tcp port")))?;
                Box::new(crate::tcp::connect(addr, &hello, timeout)?)
            }
        };
        qp.inner.attach(link, remote.to_string())
    }

    /// Listens as endpoint `name` on every port, registering it in the
    /// directory. Only peers named in `allow` may connect.
    pub fn listen(&self, name: &str, allow: &[&str]) -> Result<crate::connect::Listener> {
        self.check_open()?;
        crate::connect::Listener::bind(self, name, allow)
    }

    /// Waits up to `timeout` for an asynchronous event (peer closed or lost).
    pub fn get_async_event(&self, timeout: Duration) -> Option<AsyncEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = lock(&self.inner.events).pop_front() {
                return Some(ev);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            poll_fds(
                &[self.inner.events_bell.fd().as_raw_fd()],
                left.min(Duration::from_millis(50)),
            );
            self.inner.events_bell.drain();
        }
    }

    /// Port reset: every QP on `port` is moved to the error state (its work
    /// requests flushed, its peer told), as if it had been destroyed.
    pub fn port_reset(&self, port: Transport) -> usize {
        let mut n = 0;
        for qp in self.live_qps() {
            if qp.transport() == Some(port) {
                qp.shutdown(false);
                n += 1;
            }
        }
        n
    }

    /// Closes the access layer: every QP is flushed and its peer told the
    /// link is terminated. Later calls fail with [`IcError::Closed`].
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for qp in self.live_qps() {
            qp.shutdown(false);
        }
        let names: Vec<String> = lock(&self.inner.listeners)
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            let _ = self.inner.directory.unregister(&n);
        }
    }
}

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

/// Largest send queue depth.
pub const MAX_SEND_WR: u32 = 256;
/// Largest receive queue depth.
pub const MAX_RECV_WR: u32 = 4096;

/// Queue pair capacities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Outstanding send-queue work requests.
    pub max_send_wr: u32,
    /// Posted receive work requests.
    pub max_recv_wr: u32,
}

impl Default for QpCaps {
    fn default() -> Self {
        QpCaps {
            max_send_wr: 64,
            max_recv_wr: 256,
        }
    }
}

// ---------------------------------------------------------------------------
// Protection domains and memory regions

#[derive(Default)]
struct MrTables {
    by_lkey: HashMap<u32, Arc<MrInner>>,
    by_rkey: HashMap<u32, Arc<MrInner>>,
}

pub(crate) struct PdInner {
    id: u32,
    ctx: Weak<CtxInner>,
    mrs: RwLock<MrTables>,
    live_qps: AtomicUsize,
    dead: AtomicBool,
}

/// A protection domain: memory regions are reachable only through QPs of
/// the same PD.
#[derive(Clone)]
pub struct Pd {
    inner: Arc<PdInner>,
}

pub(crate) struct MrInner {
    lkey: u32,
    rkey: u32,
    buf: Buffer,
    off: u64,
    len: u64,
    access: Access,
    /// false once deregistered; writers of the memory hold the read lock,
    /// deregistration takes the write lock, so it waits out in-flight copies.
    valid: RwLock<bool>,
}

/// A registered memory region.
#[derive(Clone)]
pub struct Mr {
    inner: Arc<MrInner>,
    pd: Arc<PdInner>,
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
    fn lookup(&self, key: u32, remote: bool) -> Option<Arc<MrInner>> {
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
fn with_mr<R>(
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

// ---------------------------------------------------------------------------
// Completion queues

type Callback = Arc<dyn Fn() + Send + Sync>;

pub(crate) struct CqInner {
    ctx: Weak<CtxInner>,
    depth: usize,
    q: Mutex<VecDeque<WorkCompletion>>,
    overflow: AtomicBool,
    armed: AtomicBool,
    fire_pending: AtomicBool,
    bell: Doorbell,
    callback: Mutex<Option<Callback>>,
    qps: Mutex<Vec<Weak<QpInner>>>,
    users: AtomicUsize,
    dead: AtomicBool,
}

impl CqInner {
    fn push(&self, wc: WorkCompletion) {
        {
            let mut q = lock(&self.q);
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
    fn notify_pending(&self) {
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
            let cb = lock(&self.callback).clone();
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
    inner: Arc<CqInner>,
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
        for (i, qp) in lock(&self.inner.qps)
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
        let mut q = lock(&self.inner.q);
        let n = max.min(q.len());
        out.extend(q.drain(..n));
        Ok(n)
    }

    /// Arms the notification: the next completion added rings the CQ's
    /// eventfd ([`Cq::notify_fd`]) and calls the callback, once.
    pub fn req_notify(&self) {
        self.inner.armed.store(true, Ordering::Release);
        // A completion that is already queued counts: fire at once.
        let pending = !lock(&self.inner.q).is_empty();
        if pending && self.inner.armed.swap(false, Ordering::AcqRel) {
            self.inner.fire();
        }
    }

    /// Sets the function called when an armed notification fires: from the
    /// progress engine's thread, or from inside a `poll`/`post_*` call that
    /// made progress. It runs with no interconnect lock held, so it may poll
    /// this CQ, re-arm it and post work requests.
    pub fn set_callback(&self, cb: impl Fn() + Send + Sync + 'static) {
        *lock(&self.inner.callback) = Some(Arc::new(cb));
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

// ---------------------------------------------------------------------------
// Queue pairs and the progress engine

/// State of a queue pair.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QpState {
    /// Created, not connected; receives may be posted.
    #[default]
    Init,
    /// Connected to a peer.
    Connected,
    /// Broken: work requests are flushed, the peer is gone or misbehaved.
    Error(String),
    /// Destroyed locally.
    Destroyed,
}

impl std::fmt::Display for QpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QpState::Init => f.write_str("not connected"),
            QpState::Connected => f.write_str("connected"),
            QpState::Error(r) => write!(f, "in error ({r})"),
            QpState::Destroyed => f.write_str("destroyed"),
        }
    }
}

struct Pending {
    seq: u64,
    wr: SendWr,
    done: Option<WcStatus>,
    sent: bool,
}

#[derive(Default)]
struct QpSt {
    state: QpState,
    link: Option<Box<dyn Link>>,
    outstanding: VecDeque<Pending>,
    recvs: VecDeque<RecvWr>,
    incoming: VecDeque<(Msg, InData)>,
    rnr_counted: bool,
    next_seq: u64,
    peer: Option<String>,
}

/// Most requests a peer may have queued at us before we call it hostile.
const MAX_INCOMING: usize = 4 * MAX_SEND_WR as usize;
/// Messages handled per progress call, so one busy peer cannot starve others.
const BATCH: usize = 256;

pub(crate) struct QpInner {
    num: u32,
    ctx: Weak<CtxInner>,
    pd: Arc<PdInner>,
    scq: Arc<CqInner>,
    rcq: Arc<CqInner>,
    caps: QpCaps,
    st: Mutex<QpSt>,
    counters: QpCounters,
    app_poll_deadline: AtomicU64,
    stop: AtomicBool,
    destroyed: AtomicBool,
    engine: Mutex<Option<JoinHandle<()>>>,
    wake: Doorbell,
}

/// A queue pair. Dropping it destroys it.
pub struct Qp {
    pub(crate) inner: Arc<QpInner>,
}

impl Qp {
    /// QP number.
    pub fn num(&self) -> u32 {
        self.inner.num
    }

    /// Current state.
    pub fn state(&self) -> QpState {
        lock(&self.inner.st).state.clone()
    }

    /// Transport in use, once connected.
    pub fn transport(&self) -> Option<Transport> {
        self.inner.transport()
    }

    /// Counters.
    pub fn stats(&self) -> QpStats {
        self.inner.counters.snapshot()
    }

    /// Name of the connected peer.
    pub fn peer(&self) -> Option<String> {
        lock(&self.inner.st).peer.clone()
    }

    /// Posts a send-queue work request. Errors found locally (bad lkey,
    /// length) are reported as error completions, in order, like verbs do;
    /// this call fails only for a full queue, a bad argument or a QP that
    /// was never connected.
    pub fn post_send(&self, wr: SendWr) -> Result<()> {
        let r = self.inner.post_send(wr);
        self.inner.notify_cqs();
        r
    }

    /// Posts a receive work request.
    pub fn post_recv(&self, wr: RecvWr) -> Result<()> {
        let r = self.inner.post_recv(wr);
        self.inner.notify_cqs();
        r
    }

    /// Destroys the QP: its peer is told, its outstanding work requests
    /// complete with [`WcStatus::Flushed`].
    pub fn destroy(self) {
        // Drop does the work.
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        self.inner.shutdown(true);
    }
}

impl QpInner {
    pub(crate) fn transport(&self) -> Option<Transport> {
        lock(&self.st).link.as_ref().map(|l| l.transport())
    }

    pub(crate) fn expect_state(&self, want: QpState) -> Result<()> {
        let st = lock(&self.st);
        if st.state != want {
            return Err(IcError::InvalidState {
                state: st.state.to_string(),
                hint: "create a new queue pair to connect",
            });
        }
        Ok(())
    }

    pub(crate) fn attach(self: &Arc<Self>, link: Box<dyn Link>, peer: String) -> Result<()> {
        let fds = link.wait_fds();
        {
            let mut st = lock(&self.st);
            if st.state != QpState::Init {
                return Err(IcError::InvalidState {
                    state: st.state.to_string(),
                    hint: "create a new queue pair to connect",
                });
            }
            st.link = Some(link);
            st.state = QpState::Connected;
            st.peer = Some(peer);
        }
        let me = self.clone();
        let h = std::thread::Builder::new()
            .name(format!("ic-qp{}", self.num))
            .spawn(move || me.engine_loop(fds))
            .map_err(|e| IcError::io("spawn progress thread", e))?;
        *lock(&self.engine) = Some(h);
        Ok(())
    }

    fn engine_loop(self: Arc<Self>, mut fds: Vec<RawFd>) {
        fds.push(self.wake.fd().as_raw_fd());
        let mut waiter = Waiter::new(Duration::from_micros(50));
        while !self.stop.load(Ordering::Acquire) {
            if lock(&self.st).state != QpState::Connected {
                break;
            }
            if now_ns() < self.app_poll_deadline.load(Ordering::Relaxed) {
                // The application is polling and drives progress itself:
                // stay off its CPU; look in every millisecond (peer death,
                // control messages) or when woken for shutdown.
                poll_fds(&[self.wake.fd().as_raw_fd()], Duration::from_millis(1));
                self.try_progress();
                continue;
            }
            // SAFETY: the fds belong to the link (and self.wake), which live
            // until this thread has been joined.
            let bfds: Vec<BorrowedFd<'_>> = fds
                .iter()
                .map(|&f| unsafe { BorrowedFd::borrow_raw(f) })
                .collect();
            let r = waiter.wait(
                || self.stop.load(Ordering::Acquire) || self.progress_blocking(),
                |s| {
                    if let Some(l) = lock(&self.st).link.as_ref() {
                        l.arm(s)
                    }
                },
                &bfds,
                Duration::from_millis(500),
            );
            if r.is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.wake.drain();
        }
    }

    fn progress_blocking(&self) -> bool {
        let worked = {
            let mut st = lock(&self.st);
            self.progress(&mut st)
        };
        self.notify_cqs();
        worked
    }

    pub(crate) fn try_progress(&self) -> bool {
        let worked = match self.st.try_locked() {
            Some(mut st) => self.progress(&mut st),
            None => false,
        };
        self.notify_cqs();
        worked
    }

    /// Fires CQ notifications that became due while the QP lock was held.
    fn notify_cqs(&self) {
        self.scq.notify_pending();
        self.rcq.notify_pending();
    }

    fn wc(
        &self,
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u64,
        imm: Option<u32>,
    ) -> WorkCompletion {
        if status == WcStatus::Success {
            QpCounters::add(&self.counters.completions_ok, 1);
        } else {
            QpCounters::add(&self.counters.completions_err, 1);
        }
        WorkCompletion {
            wr_id,
            status,
            opcode,
            byte_len,
            imm,
            qp_num: self.num,
        }
    }

    fn send_wc_opcode(op: Opcode) -> WcOpcode {
        match op {
            Opcode::Send | Opcode::SendWithImm => WcOpcode::Send,
            Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => WcOpcode::RdmaWrite,
            Opcode::RdmaRead => WcOpcode::RdmaRead,
        }
    }

    fn post_send(&self, wr: SendWr) -> Result<()> {
        let needs_remote = matches!(
            wr.opcode,
            Opcode::RdmaWrite | Opcode::RdmaWriteWithImm | Opcode::RdmaRead
        );
        if needs_remote && wr.remote.is_none() {
            return Err(IcError::InvalidArgument(
                "RDMA work request without a remote address".into(),
            ));
        }
        let needs_imm = matches!(wr.opcode, Opcode::SendWithImm | Opcode::RdmaWriteWithImm);
        if needs_imm != wr.imm.is_some() {
            return Err(IcError::InvalidArgument(
                "immediate data must be given exactly for the *WithImm opcodes".into(),
            ));
        }
        let mut st = lock(&self.st);
        match &st.state {
            QpState::Connected => {}
            QpState::Error(_) => {
                QpCounters::add(&self.counters.sends_posted, 1);
                let wc = self.wc(
                    wr.wr_id,
                    WcStatus::Flushed,
                    Self::send_wc_opcode(wr.opcode),
                    0,
                    None,
                );
                self.scq.push(wc);
                return Ok(());
            }
            s => {
                return Err(IcError::InvalidState {
                    state: s.to_string(),
                    hint: "connect the queue pair before posting sends",
                })
            }
        }
        if st.outstanding.len() >= self.caps.max_send_wr as usize {
            return Err(IcError::QueueFull("send queue"));
        }
        QpCounters::add(&self.counters.sends_posted, 1);
        let seq = st.next_seq;
        st.next_seq += 1;
        let is_read = wr.opcode == Opcode::RdmaRead;
        let mut done = None;
        let limit = if is_read { MAX_READ } else { MAX_MESSAGE };
        let mr = self.pd.lookup(wr.sge.lkey, false);
        if wr.sge.len > limit {
            done = Some(WcStatus::LocalLength);
        } else if mr
            .as_ref()
            .and_then(|m| {
                with_mr(
                    m,
                    wr.sge.offset,
                    wr.sge.len,
                    if is_read {
                        Access::LOCAL_WRITE
                    } else {
                        Access::NONE
                    },
                    |_, _| (),
                )
            })
            .is_none()
        {
            done = Some(WcStatus::LocalProtection);
        }
        let mut link_err = None;
        if done.is_none() {
            if let (Some(mr), Some(link)) = (mr.as_ref(), st.link.as_mut()) {
                let kind = match wr.opcode {
                    Opcode::Send | Opcode::SendWithImm => Kind::Send,
                    Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => Kind::Write,
                    Opcode::RdmaRead => Kind::Read,
                };
                let mut m = Msg::new(kind, seq);
                m.imm = wr.imm;
                m.len = wr.sge.len;
                if let Some(r) = wr.remote {
                    m.rkey = r.rkey;
                    m.raddr = r.offset;
                }
                let data = if is_read {
                    OutData::None
                } else {
                    OutData::Source {
                        buf: &mr.buf,
                        off: mr.off + wr.sge.offset,
                        len: wr.sge.len,
                    }
                };
                if let Err(e) = link.send(m, data) {
                    link_err = Some(e);
                }
            }
        }
        st.outstanding.push_back(Pending {
            seq,
            wr,
            done,
            sent: done.is_none(),
        });
        if let Some(e) = link_err {
            self.fail(&mut st, Some(format!("sending to peer failed: {e}")));
        } else {
            self.complete_outstanding(&mut st);
        }
        Ok(())
    }

    fn post_recv(&self, wr: RecvWr) -> Result<()> {
        let mut st = lock(&self.st);
        match &st.state {
            QpState::Init | QpState::Connected => {}
            QpState::Error(_) => {
                QpCounters::add(&self.counters.recvs_posted, 1);
                let wc = self.wc(wr.wr_id, WcStatus::Flushed, WcOpcode::Recv, 0, None);
                self.rcq.push(wc);
                return Ok(());
            }
            s => {
                return Err(IcError::InvalidState {
                    state: s.to_string(),
                    hint: "the queue pair was destroyed",
                })
            }
        }
        if st.recvs.len() >= self.caps.max_recv_wr as usize {
            return Err(IcError::QueueFull("receive queue"));
        }
        QpCounters::add(&self.counters.recvs_posted, 1);
        st.recvs.push_back(wr);
        Ok(())
    }

    fn progress(&self, st: &mut QpSt) -> bool {
        if st.state != QpState::Connected {
            return false;
        }
        let mut worked = false;
        for _ in 0..BATCH {
            let Some(link) = st.link.as_mut() else { break };
            match link.try_recv() {
                None => break,
                Some(LinkEvent::Msg(m, d)) => {
                    worked = true;
                    self.on_msg(st, m, d);
                }
                Some(LinkEvent::Closed) => {
                    self.peer_gone(st, None);
                    return true;
                }
                Some(LinkEvent::Lost(r)) => {
                    self.peer_gone(st, Some(r));
                    return true;
                }
            }
            if st.state != QpState::Connected {
                return true;
            }
        }
        worked |= self.process_incoming(st);
        worked |= self.complete_outstanding(st);
        worked
    }

    fn on_msg(&self, st: &mut QpSt, m: Msg, d: InData) {
        match m.kind {
            Kind::Send | Kind::Write | Kind::Read => {
                if st.incoming.len() >= MAX_INCOMING {
                    self.peer_gone(st, Some("peer exceeded its send queue depth".into()));
                    return;
                }
                st.incoming.push_back((m, d));
            }
            Kind::Resp => self.on_resp(st, m, d),
            Kind::ReadDone | Kind::Close => {}
        }
    }

    fn on_resp(&self, st: &mut QpSt, m: Msg, d: InData) {
        let Some(p) = st
            .outstanding
            .iter_mut()
            .find(|p| p.sent && p.done.is_none())
        else {
            self.fail(
                st,
                Some("peer sent a response to no outstanding request".into()),
            );
            return;
        };
        let mut status = match WcStatus::from_code(m.status) {
            Some(s) if p.seq == m.seq => s,
            _ => WcStatus::BadResponse,
        };
        if status == WcStatus::Success {
            if p.wr.opcode == Opcode::RdmaRead {
                let len = p.wr.sge.len;
                if m.len != len || m.src_id != RESP_WITH_DATA || !d.valid_for(len) {
                    status = WcStatus::BadResponse;
                } else {
                    let placed = self.pd.lookup(p.wr.sge.lkey, false).and_then(|mr| {
                        with_mr(
                            &mr,
                            p.wr.sge.offset,
                            len,
                            Access::LOCAL_WRITE,
                            |map, off| d.copy_into(map, off, len),
                        )
                    });
                    status = if placed == Some(true) {
                        QpCounters::add(&self.counters.bytes_in, len);
                        WcStatus::Success
                    } else {
                        WcStatus::LocalProtection
                    };
                }
            } else {
                QpCounters::add(&self.counters.bytes_out, p.wr.sge.len);
            }
        }
        p.done = Some(status);
        if m.src_id == RESP_WITH_DATA {
            if let Some(l) = st.link.as_mut() {
                let _ = l.read_done();
            }
        }
        if status == WcStatus::BadResponse {
            self.fail(st, Some("peer sent a bad response".into()));
        }
    }

    fn respond(&self, st: &mut QpSt, seq: u64, status: WcStatus, data: OutData<'_>) -> bool {
        let mut r = Msg::new(Kind::Resp, seq);
        r.status = status.code();
        if let OutData::ReadData { len, .. } = &data {
            r.len = *len;
            r.src_id = RESP_WITH_DATA;
        }
        if status == WcStatus::Success {
            QpCounters::add(&self.counters.remote_ops_applied, 1);
        } else {
            QpCounters::add(&self.counters.remote_ops_refused, 1);
        }
        let res = match st.link.as_mut() {
            Some(l) => l.send(r, data),
            None => Err("no link".into()),
        };
        if let Err(e) = res {
            self.fail(st, Some(format!("sending response failed: {e}")));
            return false;
        }
        true
    }

    /// Applies queued peer requests in order. SENDs and WRITE_WITH_IMMs wait
    /// for a posted receive (receiver-not-ready), READs for the read window.
    fn process_incoming(&self, st: &mut QpSt) -> bool {
        let mut worked = false;
        while let Some((m, _)) = st.incoming.front() {
            let m = *m;
            let needs_recv = m.kind == Kind::Send || (m.kind == Kind::Write && m.imm.is_some());
            if needs_recv && st.recvs.is_empty() {
                if !st.rnr_counted {
                    st.rnr_counted = true;
                    QpCounters::add(&self.counters.rnr_waits, 1);
                }
                break;
            }
            if m.kind == Kind::Read && !st.link.as_ref().is_some_and(|l| l.read_window_free()) {
                break;
            }
            st.rnr_counted = false;
            let Some((m, d)) = st.incoming.pop_front() else {
                break;
            };
            worked = true;
            let ok = match m.kind {
                Kind::Send => self.apply_send(st, m, d),
                Kind::Write => self.apply_write(st, m, d),
                _ => self.apply_read(st, m),
            };
            if !ok {
                break;
            }
        }
        worked
    }

    fn apply_send(&self, st: &mut QpSt, m: Msg, d: InData) -> bool {
        if !d.valid_for(m.len) {
            return self.respond(st, m.seq, WcStatus::RemoteOperation, OutData::None);
        }
        let Some(r) = st.recvs.pop_front() else {
            return false;
        };
        let (rstatus, sstatus) = if m.len > r.sge.len {
            (WcStatus::LocalLength, WcStatus::RemoteOperation)
        } else {
            let placed = self.pd.lookup(r.sge.lkey, false).and_then(|mr| {
                with_mr(&mr, r.sge.offset, m.len, Access::LOCAL_WRITE, |map, off| {
                    d.copy_into(map, off, m.len)
                })
            });
            match placed {
                Some(true) => (WcStatus::Success, WcStatus::Success),
                Some(false) => (WcStatus::LocalProtection, WcStatus::RemoteOperation),
                None => (WcStatus::LocalProtection, WcStatus::RemoteOperation),
            }
        };
        if rstatus == WcStatus::Success {
            QpCounters::add(&self.counters.bytes_in, m.len);
        }
        let wc = self.wc(
            r.wr_id,
            rstatus,
            WcOpcode::Recv,
            if rstatus == WcStatus::Success {
                m.len
            } else {
                0
            },
            m.imm,
        );
        self.rcq.push(wc);
        self.respond(st, m.seq, sstatus, OutData::None)
    }

    fn apply_write(&self, st: &mut QpSt, m: Msg, d: InData) -> bool {
        if !d.valid_for(m.len) {
            return self.respond(st, m.seq, WcStatus::RemoteOperation, OutData::None);
        }
        let placed = self.pd.lookup(m.rkey, true).and_then(|mr| {
            with_mr(&mr, m.raddr, m.len, Access::REMOTE_WRITE, |map, off| {
                d.copy_into(map, off, m.len)
            })
        });
        let status = match placed {
            Some(true) => WcStatus::Success,
            Some(false) => WcStatus::RemoteOperation,
            None => WcStatus::RemoteAccess,
        };
        if status == WcStatus::Success {
            QpCounters::add(&self.counters.bytes_in, m.len);
            if m.imm.is_some() {
                if let Some(r) = st.recvs.pop_front() {
                    let wc = self.wc(
                        r.wr_id,
                        WcStatus::Success,
                        WcOpcode::RecvRdmaWithImm,
                        m.len,
                        m.imm,
                    );
                    self.rcq.push(wc);
                }
            }
        }
        self.respond(st, m.seq, status, OutData::None)
    }

    fn apply_read(&self, st: &mut QpSt, m: Msg) -> bool {
        if m.len > MAX_READ {
            return self.respond(st, m.seq, WcStatus::RemoteOperation, OutData::None);
        }
        let Some(mr) = self.pd.lookup(m.rkey, true) else {
            return self.respond(st, m.seq, WcStatus::RemoteAccess, OutData::None);
        };
        let valid = mr.valid.read_locked();
        if !*valid
            || !mr.access.contains(Access::REMOTE_READ)
            || m.raddr.checked_add(m.len).is_none_or(|e| e > mr.len)
        {
            drop(valid);
            return self.respond(st, m.seq, WcStatus::RemoteAccess, OutData::None);
        }
        QpCounters::add(&self.counters.bytes_out, m.len);
        let data = OutData::ReadData {
            map: mr.buf.map(),
            off: mr.off + m.raddr,
            len: m.len,
        };
        let ok = self.respond(st, m.seq, WcStatus::Success, data);
        drop(valid);
        ok
    }

    fn complete_outstanding(&self, st: &mut QpSt) -> bool {
        let mut worked = false;
        while st.outstanding.front().is_some_and(|p| p.done.is_some()) {
            let Some(p) = st.outstanding.pop_front() else {
                break;
            };
            let status = p.done.unwrap_or(WcStatus::Flushed);
            worked = true;
            if p.wr.signaled || status != WcStatus::Success {
                let len = if status == WcStatus::Success {
                    p.wr.sge.len
                } else {
                    0
                };
                let wc = self.wc(
                    p.wr.wr_id,
                    status,
                    Self::send_wc_opcode(p.wr.opcode),
                    len,
                    None,
                );
                self.scq.push(wc);
            } else if status == WcStatus::Success {
                QpCounters::add(&self.counters.completions_ok, 1);
            }
        }
        worked
    }

    /// The connection failed (send error, bad response): close it, flush
    /// everything, report [`AsyncEvent::PeerLost`].
    fn fail(&self, st: &mut QpSt, reason: Option<String>) {
        self.peer_gone(
            st,
            Some(reason.unwrap_or_else(|| "connection failed".into())),
        );
    }

    fn peer_gone(&self, st: &mut QpSt, reason: Option<String>) {
        let ev = match &reason {
            None => AsyncEvent::PeerClosed { qp_num: self.num },
            Some(r) => AsyncEvent::PeerLost {
                qp_num: self.num,
                reason: r.clone(),
            },
        };
        if let Some(l) = st.link.as_mut() {
            l.close();
        }
        self.flush(
            st,
            QpState::Error(reason.unwrap_or_else(|| "peer closed the connection".into())),
        );
        if let Some(c) = self.ctx.upgrade() {
            c.push_event(ev);
        }
    }

    fn flush(&self, st: &mut QpSt, new_state: QpState) {
        st.state = new_state;
        for p in &mut st.outstanding {
            if p.done.is_none() {
                p.done = Some(WcStatus::Flushed);
            }
        }
        self.complete_outstanding(st);
        while let Some(r) = st.recvs.pop_front() {
            let wc = self.wc(r.wr_id, WcStatus::Flushed, WcOpcode::Recv, 0, None);
            self.rcq.push(wc);
        }
        st.incoming.clear();
    }

    /// Destroy (`final_ = true`, releases the PD/CQs) or reset to error.
    pub(crate) fn shutdown(&self, final_: bool) {
        if self.destroyed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut st = lock(&self.st);
            if matches!(st.state, QpState::Init | QpState::Connected) {
                let state = if final_ {
                    QpState::Destroyed
                } else {
                    QpState::Error("port reset or access layer closed".into())
                };
                if let Some(l) = st.link.as_mut() {
                    l.close();
                }
                self.flush(&mut st, state);
            } else if final_ {
                st.state = QpState::Destroyed;
            }
        }
        self.notify_cqs();
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.notify();
        if let Some(h) = lock(&self.engine).take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        if final_ && !self.destroyed.swap(true, Ordering::AcqRel) {
            lock(&self.st).link = None;
            self.pd.live_qps.fetch_sub(1, Ordering::AcqRel);
            self.scq.users.fetch_sub(1, Ordering::AcqRel);
            self.rcq.users.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl AsFd for Cq {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.notify_fd()
    }
}
