//! The directory service: where named endpoints are found, and who may
//! reach them. [`Directory`] is the trait the access layer uses;
//! [`DirectoryServer`] serves it on a Unix socket (standalone now, hosted by
//! `partd` later) and [`DirectoryClient`] talks to that server.
//! [`MemDirectory`] is the in-process implementation the server wraps.
use partvisor_runtime::sync::MutexExt;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{IcError, Result};

/// A registered endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Unique name.
    pub name: String,
    /// Host identity (boot id): same host means the shm transport applies.
    pub host_id: String,
    /// Unix socket of the shm port.
    pub shm_path: Option<PathBuf>,
    /// Address of the tcp port.
    pub tcp_addr: Option<SocketAddr>,
    /// Endpoint names allowed to connect.
    pub allow: Vec<String>,
}

/// Name service with an allowlist check on every lookup.
pub trait Directory: Send + Sync {
    /// Adds or replaces an endpoint.
    fn register(&self, ep: Endpoint) -> Result<()>;
    /// Removes an endpoint.
    fn unregister(&self, name: &str) -> Result<()>;
    /// Looks up `to` on behalf of `from`; refused unless `from` is on `to`'s allowlist.
    fn resolve(&self, from: &str, to: &str) -> Result<Endpoint>;
}

/// In-memory directory.
#[derive(Debug, Default)]
pub struct MemDirectory {
    eps: Mutex<HashMap<String, Endpoint>>,
}

impl Directory for MemDirectory {
    fn register(&self, ep: Endpoint) -> Result<()> {
        self.eps.locked().insert(ep.name.clone(), ep);
        Ok(())
    }

    fn unregister(&self, name: &str) -> Result<()> {
        self.eps.locked().remove(name);
        Ok(())
    }

    fn resolve(&self, from: &str, to: &str) -> Result<Endpoint> {
        let eps = self.eps.locked();
        let ep = eps
            .get(to)
            .ok_or_else(|| IcError::UnknownEndpoint(to.into()))?;
        if !ep.allow.iter().any(|a| a == from) {
            return Err(IcError::Refused(format!(
                "{from:?} is not on the allowlist of {to:?}"
            )));
        }
        Ok(ep.clone())
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Register(Endpoint),
    Unregister(String),
    Resolve { from: String, to: String },
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Ok,
    Endpoint(Endpoint),
    Refused(String),
    Unknown(String),
    Error(String),
}

/// Serves a [`MemDirectory`] on a Unix socket, one JSON request and
/// response line per connection. Stops (and removes the socket) on drop.
pub struct DirectoryServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DirectoryServer {
    /// Binds `path` and serves until dropped.
    pub fn serve(path: &Path) -> Result<DirectoryServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| IcError::io(format!("bind {}", path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| IcError::io("set_nonblocking", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let dir = MemDirectory::default();
        let thread = std::thread::Builder::new()
            .name("ic-directory".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            if let Err(e) = serve_one(&dir, s) {
                                tracing::warn!("directory request failed: {e}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            crate::verbs::poll_fds(
                                &[std::os::fd::AsRawFd::as_raw_fd(&listener)],
                                Duration::from_millis(100),
                            );
                        }
                        Err(e) => {
                            tracing::warn!("directory accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .map_err(|e| IcError::io("spawn directory thread", e))?;
        Ok(DirectoryServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirectoryServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(dir: &MemDirectory, s: UnixStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&s).take(64 * 1024).read_line(&mut line)?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error(format!("malformed request: {e}")),
        Ok(Request::Register(ep)) => to_resp(dir.register(ep).map(|_| Response::Ok)),
        Ok(Request::Unregister(n)) => to_resp(dir.unregister(&n).map(|_| Response::Ok)),
        Ok(Request::Resolve { from, to }) => {
            to_resp(dir.resolve(&from, &to).map(Response::Endpoint))
        }
    };
    let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&s).write_all(&out)
}

fn to_resp(r: Result<Response>) -> Response {
    match r {
        Ok(r) => r,
        Err(IcError::Refused(m)) => Response::Refused(m),
        Err(IcError::UnknownEndpoint(n)) => Response::Unknown(n),
        Err(e) => Response::Error(e.to_string()),
    }
}

use std::io::Read as _;

/// Client of a [`DirectoryServer`].
#[derive(Debug, Clone)]
pub struct DirectoryClient {
    path: PathBuf,
}

impl DirectoryClient {
    /// A client for the server at `path`.
    pub fn new(path: &Path) -> Self {
        DirectoryClient {
            path: path.to_path_buf(),
        }
    }

    fn call(&self, req: &Request) -> Result<Response> {
        let s = UnixStream::connect(&self.path)
            .map_err(|e| IcError::io(format!("connect to directory {}", self.path.display()), e))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| IcError::io("set_read_timeout", e))?;
        let mut out = serde_json::to_vec(req).map_err(|e| IcError::Protocol(e.to_string()))?;
        out.push(b'\n');
        (&s).write_all(&out)
            .map_err(|e| IcError::io("write to directory", e))?;
        let mut line = String::new();
        BufReader::new(&s)
            .take(64 * 1024)
            .read_line(&mut line)
            .map_err(|e| IcError::io("read from directory", e))?;
        serde_json::from_str(&line)
            .map_err(|e| IcError::Protocol(format!("directory answered garbage: {e}")))
    }

    fn expect_ok(r: Response) -> Result<()> {
        match r {
            Response::Ok => Ok(()),
            Response::Refused(m) => Err(IcError::Refused(m)),
            Response::Unknown(n) => Err(IcError::UnknownEndpoint(n)),
            Response::Error(e) => Err(IcError::Protocol(e)),
            Response::Endpoint(_) => Err(IcError::Protocol("unexpected endpoint in reply".into())),
        }
    }
}

impl Directory for DirectoryClient {
    fn register(&self, ep: Endpoint) -> Result<()> {
        Self::expect_ok(self.call(&Request::Register(ep))?)
    }

    fn unregister(&self, name: &str) -> Result<()> {
        Self::expect_ok(self.call(&Request::Unregister(name.into()))?)
    }

    fn resolve(&self, from: &str, to: &str) -> Result<Endpoint> {
        match self.call(&Request::Resolve {
            from: from.into(),
            to: to.into(),
        })? {
            Response::Endpoint(ep) => Ok(ep),
            other => {
                Self::expect_ok(other).and(Err(IcError::Protocol("no endpoint in reply".into())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_directory_resolves_allowed_peers_and_refuses_others() {
        let path = std::env::temp_dir().join(format!("ic-dir-test-{}.sock", std::process::id()));
        let _srv = DirectoryServer::serve(&path).unwrap();
        let c = DirectoryClient::new(&path);
        let ep = Endpoint {
            name: "db".into(),
            host_id: "h".into(),
            shm_path: Some("/tmp/x".into()),
            tcp_addr: Some("127.0.0.1:9".parse().unwrap()),
            allow: vec!["app".into()],
        };
        c.register(ep.clone()).unwrap();
        assert_eq!(c.resolve("app", "db").unwrap(), ep);
        assert!(matches!(
            c.resolve("intruder", "db"),
            Err(IcError::Refused(_))
        ));
        assert!(matches!(
            c.resolve("app", "nope"),
            Err(IcError::UnknownEndpoint(_))
        ));
        c.unregister("db").unwrap();
        assert!(matches!(
            c.resolve("app", "db"),
            Err(IcError::UnknownEndpoint(_))
        ));
    }
}
