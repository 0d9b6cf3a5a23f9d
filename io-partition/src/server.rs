//! Listening sockets and connections: one listener per endpoint (a blk
//! export or a net switch port), one connection at a time per endpoint,
//! every endpoint in its own threads.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use partvisor_runtime::sync::{CondvarExt, MutexExt, RwLockExt};
use tracing::{error, info, warn};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{Backend, DeviceModel};
use crate::guard;

/// Guest memory as the vhost-user daemon publishes it.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// What the listener needs from a served thing (a blk export, a net port).
pub trait Endpoint: Send + Sync + 'static {
    /// The device model serving one connection (inside a [`Backend`]).
    type Model: DeviceModel;
    /// The vhost-user socket path.
    fn socket(&self) -> &Path;
    /// Name used in log lines: the socket path.
    fn name(&self) -> std::path::Display<'_> {
        self.socket().display()
    }
    /// Short device kind for thread names (`blk`, `net`).
    fn kind(&self) -> &'static str;
    /// The most guest memory (bytes) a frontend's memory table may map in
    /// total: the partition's grant, as partd gave it; `None` if it was
    /// not given (part-io started by hand).
    fn memory_limit(&self) -> Option<u64> {
        None
    }
    /// The only uid whose frontend may connect: the partition's monitor,
    /// as partd started it; `None` (part-io started by hand): root and
    /// part-io's own uid.
    fn frontend_uid(&self) -> Option<u32> {
        None
    }
    /// A fresh device for one connection; `mem` is the memory the daemon
    /// will publish to it (the same `GuestMemoryAtomic`).
    fn new_model(self: &Arc<Self>, mem: &Mem) -> Self::Model;
    /// Counts a new connection; returns its number.
    fn count_connection(&self) -> u64;
    /// Counts a connection refused by the memory-region check.
    fn count_refused_region(&self);
    /// One line with every counter, for logs.
    fn summary(&self) -> String;
    /// Called when a connection's frontend is gone, and again after its
    /// daemon is gone (its worker joined); must be idempotent.
    fn disconnected(&self) {}
    /// Whether the endpoint was taken out of service: its listener stops
    /// at the next accept (a vsock port partd removed).
    fn retired(&self) -> bool {
        false
    }
}

/// Errors setting up an export's socket or serving one connection.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// `vhost_user_backend::Error` implements `Display` but not
    /// `std::error::Error`, so it is carried as data, not as a source.
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot set up the private daemon socket: {0}")]
    Private(#[source] io::Error),
    #[error("guest memory refused: {0}")]
    Refused(#[source] guard::GuardError),
    #[error("vhost-user message guard: {0}")]
    Guard(#[source] guard::GuardError),
}

/// Why a listening Unix socket could not be set up at a path.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{what} path {path} exists and is not a socket; refusing to replace it")]
    NotASocket { what: &'static str, path: PathBuf },
    #[error("cannot replace {what} {path}: {source}")]
    Replace {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot listen on {what} {path}: {source}")]
    Bind {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Answers every connection on `listener` with one line, `line()` and a
/// newline, forever (the stats sockets of the switch and the vsock relay).
pub fn serve_lines(listener: UnixListener, line: impl Fn() -> String) {
    for conn in listener.incoming() {
        match conn {
            Ok(mut s) => {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let mut text = line();
                text.push('\n');
                let _ = io::Write::write_all(&mut s, text.as_bytes());
            }
            Err(e) => {
                warn!("stats socket accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Listens on `path`, replacing a stale socket there; any other file there
/// is an error. `what` names the socket in errors (`socket`, `stats socket`).
pub fn listen(what: &'static str, path: &Path) -> Result<UnixListener, ListenError> {
    let path = path.to_path_buf();
    if let Ok(meta) = fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket { what, path });
        }
        fs::remove_file(&path).map_err(|source| ListenError::Replace {
            what,
            path: path.clone(),
            source,
        })?;
    }
    UnixListener::bind(&path).map_err(|source| ListenError::Bind { what, path, source })
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

/// [`bind`] for an endpoint that is already shared (a switch port). The
/// socket is owner-only (mode 0600): only part-io's own uid (and root)
/// can reach it, and [`Bound::serve`] checks the connecting uid again.
pub fn bind_shared<E: Endpoint>(export: Arc<E>) -> Result<Bound<E>, ServeError> {
    let listener = listen("socket", export.socket())?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(export.socket(), fs::Permissions::from_mode(0o600)).map_err(|source| {
        ListenError::Bind {
            what: "socket",
            path: export.socket().to_owned(),
            source,
        }
    })?;
    Ok(Bound { export, listener })
}

/// Whether a frontend with `uid` may connect: the expected one if partd
/// named it, else part-io's own uid or root.
fn frontend_allowed(uid: u32, expected: Option<u32>) -> bool {
    match expected {
        Some(e) => uid == e,
        None => uid == 0 || uid == partvisor_runtime::peer::own_uid(),
    }
}

impl<E: Endpoint> Bound<E> {
    /// The endpoint.
    pub fn export(&self) -> &Arc<E> {
        &self.export
    }

    /// Accepts connections, one at a time, until the endpoint is retired
    /// (see [`wake`]). A frontend that connects
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
            if self.export.retired() {
                info!(export = %self.export.name(), "taken out of service; no longer listening");
                return;
            }
            match partvisor_runtime::peer::peer_uid(&stream) {
                Ok(uid) if frontend_allowed(uid, self.export.frontend_uid()) => {}
                who => {
                    static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
                    if let Some(n) = LIMIT.allow() {
                        let who = who.map_or_else(|e| format!("unknown ({e})"), |u| u.to_string());
                        warn!(export = %self.export.name(), "refused a frontend of uid {who}: only {} may connect{}", self.export.frontend_uid().map_or_else(|| "part-io's own uid and root".to_string(), |u| format!("uid {u}")), suppressed_note(n));
                    }
                    drop(stream);
                    continue;
                }
            }
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

/// Wakes the listener on `path` so that it sees its endpoint retired:
/// connects once (the listener drops that connection and ends), then removes
/// the socket file.
pub fn wake(path: &Path) {
    let _ = UnixStream::connect(path);
    let _ = fs::remove_file(path);
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
    let backend = Arc::new(RwLock::new(Backend::new(export.new_model(&mem))));
    let result = session(export, backend.clone(), mem, frontend);
    // `session` dropped the daemon, which joined its vring worker.
    export.disconnected();
    let mut backend = backend.write_locked();
    // SAFETY: the daemon that used these fds is dropped and its worker joined.
    unsafe { backend.exit_fds_mut().close_all() };
    result
}

fn session<E: Endpoint>(
    export: &Arc<E>,
    backend: Arc<RwLock<Backend<E::Model>>>,
    mem: Mem,
    frontend: UnixStream,
) -> Result<(), ServeError> {
    let mut daemon = VhostUserDaemon::new(
        format!("part-io-{}-{}", export.kind(), export.name()),
        backend,
        mem,
    )
    .map_err(ServeError::Daemon)?;

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
    daemon.start_client(path_str).map_err(ServeError::Daemon)?;
    let (inner, _) = private.accept().map_err(ServeError::Private)?;
    drop(private);
    drop(dir);

    let guard_result = guard::relay(frontend, inner, export.memory_limit());
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
