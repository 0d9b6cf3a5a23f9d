//! The access layer: opening it, querying it and its ports, creating the
//! objects that hang off it, connecting QPs to named endpoints, async
//! events, port reset and close.
use partvisor_runtime::sync::MutexExt;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use channels::Doorbell;

use super::cq::{Cq, CqInner};
use super::pd::{MrTables, Pd, PdInner};
use super::poll_fds;
use super::qp::{Qp, QpCaps, QpInner, QpSt, QpState, MAX_RECV_WR, MAX_SEND_WR};
use crate::directory::{Directory, Endpoint};
use crate::link::Link;
use crate::types::*;
use crate::{IcError, Result};

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
    pub(super) next_qp: AtomicU32,
    pub(super) next_pd: AtomicU32,
    pub(super) pds: AtomicUsize,
    pub(super) cqs: AtomicUsize,
    pub(super) qps: Mutex<Vec<Weak<QpInner>>>,
    pub(super) events: Mutex<VecDeque<AsyncEvent>>,
    pub(super) events_bell: Doorbell,
    pub listeners: Mutex<Vec<(String, Vec<String>)>>,
    pub(super) closed: AtomicBool,
}

impl CtxInner {
    pub(super) fn push_event(&self, ev: AsyncEvent) {
        self.events.locked().push_back(ev);
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
        // The name is ours before anything is done under it: peers resolve
        // and connect as `name` only with the uid that holds it.
        directory.claim(name)?;
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
        let mut v = self.inner.qps.locked();
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
            .filter_map(|q| q.st.locked().peer.clone())
            .collect();
        let mut out = Vec::new();
        for (local, allow) in self.inner.listeners.locked().iter() {
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
            let mut list = cq.qps.locked();
            list.retain(|w| {
                w.upgrade()
                    .is_some_and(|q| !q.destroyed.load(Ordering::Acquire))
            });
            list.push(Arc::downgrade(&qp));
        }
        self.inner.qps.locked().push(Arc::downgrade(&qp));
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
        let resolved = self.inner.directory.resolve(&self.inner.name, remote)?;
        let ep: Endpoint = resolved.endpoint;
        let t = transport.unwrap_or(
            if ep.host_id == self.inner.host_id && ep.shm_path.is_some() {
                Transport::Shm
            } else {
                Transport::Tcp
            },
        );
        qp.inner.expect_state(QpState::Init)?;
        let intro = crate::connect::Intro {
            from: &self.inner.name,
            to: remote,
            transport: t,
            secret: &resolved.secret,
        };
        let link: Box<dyn Link> = match t {
            Transport::Shm => {
                let path = ep
                    .shm_path
                    .ok_or_else(|| IcError::Protocol(format!("{remote} has no shm port")))?;
                Box::new(crate::shm::connect(&path, &intro, timeout)?)
            }
            Transport::Tcp => {
                let addr = ep
                    .tcp_addr
                    .ok_or_else(|| IcError::Protocol(format!("{remote} has no tcp port")))?;
                Box::new(crate::tcp::connect(addr, &intro, timeout)?)
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
            if let Some(ev) = self.inner.events.locked().pop_front() {
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
        let names: Vec<String> = self
            .inner
            .listeners
            .locked()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            let _ = self.inner.directory.withdraw(&n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, eventually, pair, PATIENCE};
    use super::*;
    use crate::directory::MemDirectory;

    #[test]
    fn open_refuses_empty_overlong_or_path_like_names() {
        let dir: Arc<dyn Directory> = Arc::new(MemDirectory::default());
        let open = |n: &str| Context::open(n, dir.clone(), ContextOptions::default());
        for bad in [String::new(), "x".repeat(201), "a/b".into(), "a\0b".into()] {
            assert!(
                matches!(open(&bad), Err(IcError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert_eq!(open(&"x".repeat(200)).unwrap().name().len(), 200);
    }

    #[test]
    fn query_counts_the_live_objects_and_reports_the_limits() {
        let c = ctx("app");
        let pd = c.alloc_pd().unwrap();
        let cq = c.create_cq(8).unwrap();
        let qp = c.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
        let a = c.query();
        assert_eq!((a.name.as_str(), a.pds, a.cqs, a.qps), ("app", 1, 1, 1));
        assert_eq!((a.max_message, a.max_read), (MAX_MESSAGE, MAX_READ));
        assert!(!a.host_id.is_empty());
        let unconnected: Vec<_> = c.query_ports().iter().map(|p| p.active_qps).collect();
        assert_eq!(unconnected, [0, 0], "an unconnected QP uses no port");
        drop(qp);
        assert_eq!(c.query().qps, 0);
    }

    #[test]
    fn remote_ports_are_the_allowlists_with_connected_peers_marked() {
        let p = pair(Transport::Shm, QpCaps::default());
        let _other = p.srv.ctx.listen("other", &["nobody"]).unwrap();
        let mut ports = p.srv.ctx.query_remote_ports();
        ports.sort_by(|a, b| a.local.cmp(&b.local));
        assert_eq!(
            ports,
            [
                RemotePort {
                    name: "nobody".into(),
                    local: "other".into(),
                    connected: false
                },
                RemotePort {
                    name: "cli".into(),
                    local: "svc".into(),
                    connected: true
                },
            ]
        );
    }

    #[test]
    fn connect_needs_a_known_name_that_allows_us() {
        let dir: Arc<dyn Directory> = Arc::new(MemDirectory::default());
        let srv = Context::open("srv", dir.clone(), ContextOptions::default()).unwrap();
        let eve = Context::open("eve", dir, ContextOptions::default()).unwrap();
        let _l = srv.listen("svc", &["cli"]).unwrap();
        let pd = eve.alloc_pd().unwrap();
        let cq = eve.create_cq(8).unwrap();
        let qp = eve.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
        assert!(matches!(
            eve.connect(&qp, "nosuch", None, PATIENCE),
            Err(IcError::UnknownEndpoint(n)) if n == "nosuch"
        ));
        assert!(matches!(
            eve.connect(&qp, "svc", None, PATIENCE),
            Err(IcError::Refused(_))
        ));
        assert_eq!(
            qp.state(),
            QpState::Init,
            "a refused connect leaves the QP usable"
        );
    }

    #[test]
    fn get_async_event_returns_none_after_the_timeout() {
        let c = ctx("a");
        let t = Instant::now();
        assert_eq!(c.get_async_event(Duration::from_millis(30)), None);
        assert!(t.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn close_flushes_qps_tells_the_peer_unregisters_and_refuses_new_objects() {
        let p = pair(Transport::Shm, QpCaps::default());
        p.srv.ctx.close();
        assert!(matches!(p.srv.qp.state(), QpState::Error(_)));
        for r in [
            p.srv.ctx.alloc_pd().err(),
            p.srv.ctx.create_cq(8).err(),
            p.srv.ctx.listen("again", &[]).err(),
        ] {
            assert!(matches!(r, Some(IcError::Closed)), "{r:?}");
        }
        assert!(matches!(
            p.srv.ctx.inner.directory.resolve("cli", "svc"),
            Err(IcError::UnknownEndpoint(_))
        ));
        let cli_num = p.cli.qp.num();
        assert_eq!(
            p.cli.ctx.get_async_event(PATIENCE),
            Some(AsyncEvent::PeerClosed { qp_num: cli_num })
        );
        assert!(eventually(|| matches!(p.cli.qp.state(), QpState::Error(_))));
    }
}
