//! Listening sockets and connections: one listener per endpoint (a blk
//! export or a net switch port), one connection at a time per endpoint,
//! every endpoint in its own threads.

use partvisor_runtime::sync::{CondvarExt, MutexExt, RwLockExt};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::guard;

/// Guest memory as the vhost-user daemon publishes it.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Refuses any epoll event set but `IN` on a queue's kick: what both device
/// models' `handle_event` accept.
pub(crate) fn check_kick_events(evset: EventSet) -> io::Result<()> {
    if evset != EventSet::IN {
        return Err(io::Error::other(format!(
            "unexpected epoll events {evset:?}"
        )));
    }
    Ok(())
}

/// Exactly `size` bytes of `config` from `offset` (frontends check the reply
/// length); bytes beyond `config` read as zero.
pub(crate) fn config_bytes(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    (offset..offset.saturating_add(size))
        .map(|i| config.get(i as usize).copied().unwrap_or(0))
        .collect()
}

/// Runs `process` on `vring` until it is drained. Without EVENT_IDX that is
/// one pass; with it, notifications stay off while draining and the queue is
/// drained again if the driver posted more before they were back on.
/// `warn(backend, what, error)` logs a notification toggle that failed.
pub(crate) fn drain_queue<B>(
    backend: &mut B,
    vring: &VringRwLock,
    event_idx: bool,
    process: fn(&mut B, &VringRwLock) -> io::Result<()>,
    warn: fn(&B, &str, &dyn std::fmt::Display),
) -> io::Result<()> {
    if !event_idx {
        return process(backend, vring);
    }
    loop {
        if let Err(e) = vring.disable_notification() {
            warn(backend, "cannot disable notifications", &e);
        }
        process(backend, vring)?;
        match vring.enable_notification() {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                warn(backend, "cannot enable notifications", &e);
                break;
            }
        }
    }
    Ok(())
}

/// What the listener needs from a served thing (a blk export, a net port).
pub trait Endpoint: Send + Sync + 'static {
    /// The device model serving one connection.
    type Backend: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + Send + Sync + 'static;
    /// The vhost-user socket path.
    fn socket(&self) -> &Path;
    /// Name used in log lines: the socket path.
    fn name(&self) -> std::path::Display<'_> {
        self.socket().display()
    }
    /// Short device kind for thread names (`blk`, `net`).
    fn kind(&self) -> &'static str;
    /// A fresh device for one connection; `mem` is the memory the daemon
    /// will publish to it (the same `GuestMemoryAtomic`).
    fn new_backend(self: &Arc<Self>, mem: &Mem) -> Self::Backend;
    /// Counts a new connection; returns its number.
    fn count_connection(&self) -> u64;
    /// Counts a connection refused by the memory-region check.
    fn count_refused_region(&self);
    /// One line with every counter, for logs.
    fn summary(&self) -> String;
    /// Called when a connection's frontend is gone, and again after its
    /// daemon is gone (its worker joined); must be idempotent.
    fn disconnected(&self) {}
    /// The backend's worker exit eventfds (see [`ExitFds`]).
    fn exit_fds(backend: &mut Self::Backend) -> &mut ExitFds;
}

/// The consumer ends of the worker exit eventfds a backend hands out in
/// `VhostUserBackendMut::exit_event`.
///
/// `vhost-user-backend` 0.24 turns them into raw fds for its epoll set and
/// never closes them; without this every connection would leak one fd, and a
/// frontend reconnecting in a loop could exhaust the process's fd table for
/// every endpoint.
#[derive(Debug, Default)]
pub struct ExitFds(Mutex<Vec<RawFd>>);

impl ExitFds {
    /// A new exit eventfd pair; the consumer's fd is remembered for
    /// [`ExitFds::close_all`].
    pub fn create(&self) -> io::Result<(EventConsumer, EventNotifier)> {
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        self.0.locked().push(pair.0.as_raw_fd());
        Ok(pair)
    }

    /// Closes every remembered consumer fd.
    ///
    /// # Safety
    ///
    /// Call only after the `VhostUserDaemon` that used these fds has been
    /// dropped (its worker threads are joined then), so nothing uses them.
    pub unsafe fn close_all(&mut self) {
        let fds = self.0.get_mut_unpoisoned();
        for fd in fds.drain(..) {
            // SAFETY: per this function's contract the fd is owned by nobody.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// Errors setting up an export's socket or serving one connection.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot set up the private daemon socket: {0}")]
    Private(io::Error),
    #[error("guest memory refused: {0}")]
    Refused(guard::GuardError),
    #[error("vhost-user message guard: {0}")]
    Guard(guard::GuardError),
}

/// An endpoint bound to its listening socket, ready to serve.
pub struct Bound<E: Endpoint> {
    export: Arc<E>,
    listener: UnixListener,
}

/// Binds the listening socket of `export`. A stale socket at the path is
/// replaced; any other file there is an error.
pub fn bind<E: Endpoint>(export: E) -> Result<Bound<E>, ServeError> {
    bind_shared(Arc::new(export))
}

/// [`bind`] for an endpoint that is already shared (a switch port).
pub fn bind_shared<E: Endpoint>(export: Arc<E>) -> Result<Bound<E>, ServeError> {
    let path = export.socket().to_path_buf();
    if let Ok(meta) = fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path));
        }
        fs::remove_file(&path).map_err(|source| ServeError::Bind {
            path: path.clone(),
            source,
        })?;
    }
    let listener = UnixListener::bind(&path).map_err(|source| ServeError::Bind { path, source })?;
    Ok(Bound { export, listener })
}

impl<E: Endpoint> Bound<E> {
    /// The endpoint.
    pub fn export(&self) -> &Arc<E> {
        &self.export
    }

    /// Accepts connections forever, one at a time. A frontend that connects
    /// while another is being served waits up to [`HANDOVER_GRACE`] for the
    /// previous session to finish tearing down (a VMM that reconnects right
    /// after a disconnect, or a readiness probe followed by the real
    /// connection), and is then logged and disconnected. A connection that
    /// ends (or is refused) never stops the listener.
    pub fn serve(self) {
        let slot = Arc::new(Slot::default());
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(export = %self.export.name(), "accept failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if !slot.acquire(HANDOVER_GRACE) {
                warn!(export = %self.export.name(), "refusing a second frontend: the export is already connected");
                drop(stream);
                continue;
            }
            let export = self.export.clone();
            let done = slot.clone();
            let spawned = thread::Builder::new()
                .name("part-io-conn".into())
                .spawn(move || {
                    serve_connection(&export, stream);
                    done.release();
                });
            if let Err(e) = spawned {
                error!(export = %self.export.name(), "cannot start a connection thread: {e}");
                slot.release();
            }
        }
    }
}

/// How long a new frontend waits for the previous session of its export to end.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(2);

/// The one connection slot of an export.
#[derive(Default)]
struct Slot {
    busy: Mutex<bool>,
    freed: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.busy.locked()
    }

    /// Takes the slot, waiting up to `grace` for it; false if still busy.
    fn acquire(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut busy = self.lock();
        while *busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            busy = self.freed.wait_timeout_locked(busy, left).0;
        }
        *busy = true;
        true
    }

    fn release(&self) {
        *self.lock() = false;
        self.freed.notify_all();
    }
}

fn serve_connection<E: Endpoint>(export: &Arc<E>, frontend: UnixStream) {
    let n = export.count_connection();
    info!(export = %export.name(), "frontend connected (connection {n})");
    match run_connection(export, frontend) {
        Ok(()) => {
            info!(export = %export.name(), "frontend disconnected; {}", export.summary())
        }
        Err(e) => {
            error!(export = %export.name(), "connection failed: {e}; {}", export.summary())
        }
    }
}

/// Serves one frontend with a fresh device: a `VhostUserDaemon` behind the
/// [`guard`] relay.
fn run_connection<E: Endpoint>(export: &Arc<E>, frontend: UnixStream) -> Result<(), ServeError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(RwLock::new(export.new_backend(&mem)));
    let result = session(export, backend.clone(), mem, frontend);
    // `session` dropped the daemon, which joined its vring worker.
    export.disconnected();
    let mut backend = backend.write_locked();
    // SAFETY: the daemon that used these fds is dropped and its worker joined.
    unsafe { E::exit_fds(&mut backend).close_all() };
    result
}

fn session<E: Endpoint>(
    export: &Arc<E>,
    backend: Arc<RwLock<E::Backend>>,
    mem: Mem,
    frontend: UnixStream,
) -> Result<(), ServeError> {
    let mut daemon = VhostUserDaemon::new(
        format!("part-io-{}-{}", export.kind(), export.name()),
        backend,
        mem,
    )
    .map_err(|e| ServeError::Daemon(e.to_string()))?;

    // The daemon talks only to the guard, over a socket in a private directory.
    let dir = tempfile::Builder::new()
        .prefix("part-io-")
        .tempdir()
        .map_err(ServeError::Private)?;
    let path = dir.path().join("daemon.sock");
    let private = UnixListener::bind(&path).map_err(ServeError::Private)?;
    let path_str = path
        .to_str()
        .ok_or_else(|| ServeError::Private(io::Error::other("temporary path is not UTF-8")))?;
    daemon
        .start_client(path_str)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    let (inner, _) = private.accept().map_err(ServeError::Private)?;
    drop(private);
    drop(dir);

    let guard_result = guard::relay(frontend, inner);
    // The frontend is gone: stop other endpoints (switch ports) from writing
    // into this guest right away, not only once the daemon has wound down.
    export.disconnected();
    // The relay has shut both sockets down, so the daemon thread ends.
    let daemon_result = daemon.wait();
    match guard_result {
        Err(e) if e.is_region_refusal() => {
            export.count_refused_region();
            Err(ServeError::Refused(e))
        }
        Err(e) => Err(ServeError::Guard(e)),
        Ok(()) => {
            if let Err(e) = daemon_result {
                // A frontend that simply went away shows up here as a
                // disconnect; only log it.
                info!(export = %export.name(), "vhost-user session ended: {e}");
            }
            Ok(())
        }
    }
}
