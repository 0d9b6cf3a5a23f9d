//! A partition's sockets bound and ready to serve: its vhost-user socket
//! and, if it has host services, its hybrid host socket. Static ports
//! (`--port`) and ports added over the control socket are bound the same
//! way, so they behave the same.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::backend::VsockEndpoint;
use super::hybrid::{self, HostSide};
use super::relay::{Relay, VsockPort};
use super::spec::VsockError;
use crate::server::{self, Bound, ListenError, ServeError};

/// Why a partition's sockets could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Host(VsockError),
    #[error(transparent)]
    Serve(Box<ServeError>),
    #[error(transparent)]
    HostListen(ListenError),
    #[error("cannot start a listener thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A port whose sockets are bound, not yet served.
pub struct BoundPort {
    relay: Arc<Relay>,
    vhost: Bound<VsockEndpoint>,
    host: Option<UnixListener>,
}

/// Binds the sockets of partition `cid`; nothing is reachable until
/// [`BoundPort::spawn`]. On failure no socket is left behind.
pub fn bind(
    relay: &Arc<Relay>,
    cid: u32,
    socket: PathBuf,
    host_socket: Option<PathBuf>,
    memory_limit: Option<u64>,
    frontend_uid: Option<u32>,
) -> Result<BoundPort, BindError> {
    let host = host_socket
        .map(HostSide::new)
        .transpose()
        .map_err(BindError::Host)?;
    let port = VsockPort::new(cid, socket, host, memory_limit, frontend_uid);
    let vhost = server::bind_shared(Arc::new(VsockEndpoint::new(relay.clone(), port.clone())))
        .map_err(|e| BindError::Serve(Box::new(e)))?;
    let host = match port.host.as_ref().map(hybrid::listen::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&port.socket);
            return Err(BindError::HostListen(e));
        }
    };
    Ok(BoundPort {
        relay: relay.clone(),
        vhost,
        host,
    })
}

impl BoundPort {
    /// The port.
    pub fn port(&self) -> &Arc<VsockPort> {
        self.vhost.export().vsock_port()
    }

    /// Makes the port reachable in the relay and starts its listeners; the
    /// caller has set its directory entry. On failure the port is taken
    /// out again.
    pub fn spawn(self) -> Result<Vec<JoinHandle<()>>, BindError> {
        let port = self.port().clone();
        self.relay.insert_port(port.clone());
        let mut threads = Vec::new();
        let vhost = self.vhost;
        let started = std::thread::Builder::new()
            .name("part-io-listen".into())
            .spawn(move || vhost.serve());
        match started {
            Ok(t) => threads.push(t),
            Err(e) => {
                self.relay.remove(port.cid);
                return Err(BindError::Thread(e));
            }
        }
        if let Some(listener) = self.host {
            let (r, p) = (self.relay.clone(), port.clone());
            let started = std::thread::Builder::new()
                .name("part-io-host".into())
                .spawn(move || hybrid::listen::serve(listener, r, p));
            match started {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.relay.remove(port.cid);
                    server::wake(&port.socket);
                    return Err(BindError::Thread(e));
                }
            }
        }
        Ok(threads)
    }
}
