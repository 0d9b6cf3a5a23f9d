//! Listening sockets and connections: one listener per export, one
//! connection at a time per export, every export in its own threads.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::blk::BlkBackend;
use crate::export::Export;
use crate::guard;

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

/// An export bound to its listening socket, ready to serve.
pub struct BoundExport {
    export: Arc<Export>,
    listener: UnixListener,
}

/// Binds the listening socket of `export`. A stale socket at the path is
/// replaced; any other file there is an error.
pub fn bind(export: Export) -> Result<BoundExport, ServeError> {
    let path = export.spec.socket.clone();
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
    Ok(BoundExport {
        export: Arc::new(export),
        listener,
    })
}

impl BoundExport {
    /// The export.
    pub fn export(&self) -> &Arc<Export> {
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
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
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
            busy = self
                .freed
                .wait_timeout(busy, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *busy = true;
        true
    }

    fn release(&self) {
        *self.lock() = false;
        self.freed.notify_all();
    }
}

fn serve_connection(export: &Arc<Export>, frontend: UnixStream) {
    let n = export.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    info!(export = %export.name(), "frontend connected (connection {n})");
    match run_connection(export, frontend) {
        Ok(()) => {
            info!(export = %export.name(), "frontend disconnected; {}", export.stats.summary())
        }
        Err(e) => {
            error!(export = %export.name(), "connection failed: {e}; {}", export.stats.summary())
        }
    }
}

/// Serves one frontend with a fresh device: a `VhostUserDaemon` behind the
/// [`guard`] relay.
fn run_connection(export: &Arc<Export>, frontend: UnixStream) -> Result<(), ServeError> {
    let backend = Arc::new(RwLock::new(BlkBackend::new(export.clone())));
    let result = session(export, backend.clone(), frontend);
    // `session` dropped the daemon, which joined its vring worker.
    let mut backend = backend
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // SAFETY: the daemon that used these fds is dropped and its worker joined.
    unsafe { backend.close_exit_fds() };
    result
}

fn session(
    export: &Arc<Export>,
    backend: Arc<RwLock<BlkBackend>>,
    frontend: UnixStream,
) -> Result<(), ServeError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("part-io-blk-{}", export.name()), backend, mem)
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
    // The relay has shut both sockets down, so the daemon thread ends.
    let daemon_result = daemon.wait();
    match guard_result {
        Err(e) if e.is_region_refusal() => {
            export.stats.refused_regions.fetch_add(1, Ordering::Relaxed);
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
