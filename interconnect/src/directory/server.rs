//! The directory on a Unix socket: one JSON request and one response line
//! per connection, the caller's uid taken from the kernel.
use partvisor_runtime::peer::peer_uid;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Directory, Endpoint, MemDirectory, Resolved};
use crate::proof::ListenerKey;
use crate::{IcError, Result};

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Claim(String),
    Register(Endpoint),
    Withdraw(String),
    Unregister(String),
    Key(String),
    Reserve { name: String, uid: u32 },
    Resolve { from: String, to: String },
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Ok,
    Registered(ListenerKey),
    Resolved(Resolved),
    Refused(String),
    Invalid(String),
    Unknown(String),
    Error(String),
}

/// Serves a [`MemDirectory`] on a Unix socket, one JSON request and
/// response line per connection. Stops (and removes the socket) on drop.
pub struct DirectoryServer {
    path: PathBuf,
    dir: Arc<MemDirectory>,
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
        let dir = Arc::new(MemDirectory::default());
        let served = dir.clone();
        let thread = std::thread::Builder::new()
            .name("ic-directory".into())
            .spawn(move || {
                let busy = Arc::new(AtomicUsize::new(0));
                while !stop2.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((s, _)) => serve_in_thread(&served, &busy, s),
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
            dir,
            stop,
            thread: Some(thread),
        })
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory served, for its host process (e.g. to reserve names).
    pub fn directory(&self) -> &MemDirectory {
        &self.dir
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

/// Clients served at once; one more is told the directory is busy.
const MAX_CLIENTS: usize = 16;
/// How long one client may take to send its request, in all.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Longest request line.
const MAX_REQUEST: usize = 64 * 1024;

/// Serves `s` on a thread of its own, so a slow client delays nobody else,
/// up to [`MAX_CLIENTS`] at once.
fn serve_in_thread(dir: &Arc<MemDirectory>, busy: &Arc<AtomicUsize>, s: UnixStream) {
    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        busy.fetch_sub(1, Ordering::AcqRel);
        let _ = reply(
            &s,
            &Response::Error("the directory is busy; try again".into()),
        );
        return;
    }
    let (dir, busy2) = (dir.clone(), busy.clone());
    let spawned = std::thread::Builder::new()
        .name("ic-directory-client".into())
        .spawn(move || {
            if let Err(e) = serve_one(&dir, s) {
                tracing::debug!("directory request failed: {e}");
            }
            busy2.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        busy.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!("directory: cannot start a client thread: {e}");
    }
}

/// One request line, read within [`REQUEST_DEADLINE`] in all (a client that
/// trickles bytes does not get a fresh timeout per read).
fn read_request(mut s: &UnixStream) -> std::io::Result<Vec<u8>> {
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.contains(&b'\n') {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || line.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request not sent in time or too long",
            ));
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    Ok(line)
}

fn reply(mut s: &UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    s.write_all(&out)
}

fn serve_one(dir: &MemDirectory, s: UnixStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    let caller = peer_uid(&s)?;
    let line = read_request(&s)?;
    let resp = match serde_json::from_slice::<Request>(&line) {
        Err(e) => Response::Error(format!("malformed request: {e}")),
        Ok(Request::Claim(n)) => to_resp(dir.claim_as(caller, &n).map(|()| Response::Ok)),
        Ok(Request::Register(ep)) => to_resp(dir.register_as(caller, ep).map(Response::Registered)),
        Ok(Request::Withdraw(n)) => to_resp(dir.withdraw_as(caller, &n).map(|()| Response::Ok)),
        Ok(Request::Unregister(n)) => to_resp(dir.unregister_as(caller, &n).map(|()| Response::Ok)),
        Ok(Request::Key(n)) => to_resp(dir.key_as(caller, &n).map(Response::Registered)),
        Ok(Request::Reserve { name, uid }) => {
            to_resp(dir.reserve_as(caller, &name, uid).map(|()| Response::Ok))
        }
        Ok(Request::Resolve { from, to }) => {
            to_resp(dir.resolve_as(caller, &from, &to).map(Response::Resolved))
        }
    };
    reply(&s, &resp)
}

fn to_resp(r: Result<Response>) -> Response {
    match r {
        Ok(r) => r,
        Err(IcError::Refused(m)) => Response::Refused(m),
        Err(IcError::UnknownEndpoint(n)) => Response::Unknown(n),
        Err(IcError::InvalidArgument(m)) => Response::Invalid(m),
        Err(e) => Response::Error(e.to_string()),
    }
}

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
            Response::Invalid(m) => Err(IcError::InvalidArgument(m)),
            Response::Error(e) => Err(IcError::Protocol(e)),
            Response::Registered(_) | Response::Resolved(_) => {
                Err(IcError::Protocol("unexpected payload in reply".into()))
            }
        }
    }
}

impl DirectoryClient {
    /// Reserves `name` for `uid` (the server refuses unless we are root).
    pub fn reserve(&self, name: &str, uid: u32) -> Result<()> {
        Self::expect_ok(self.call(&Request::Reserve {
            name: name.into(),
            uid,
        })?)
    }
}

impl Directory for DirectoryClient {
    fn claim(&self, name: &str) -> Result<()> {
        Self::expect_ok(self.call(&Request::Claim(name.into()))?)
    }

    fn register(&self, ep: Endpoint) -> Result<ListenerKey> {
        match self.call(&Request::Register(ep))? {
            Response::Registered(k) => Ok(k),
            other => Self::expect_ok(other).and(Err(IcError::Protocol("no key in reply".into()))),
        }
    }

    fn withdraw(&self, name: &str) -> Result<()> {
        Self::expect_ok(self.call(&Request::Withdraw(name.into()))?)
    }

    fn unregister(&self, name: &str) -> Result<()> {
        Self::expect_ok(self.call(&Request::Unregister(name.into()))?)
    }

    fn key(&self, name: &str) -> Result<ListenerKey> {
        match self.call(&Request::Key(name.into()))? {
            Response::Registered(k) => Ok(k),
            other => Self::expect_ok(other).and(Err(IcError::Protocol("no key in reply".into()))),
        }
    }

    fn resolve(&self, from: &str, to: &str) -> Result<Resolved> {
        match self.call(&Request::Resolve {
            from: from.into(),
            to: to.into(),
        })? {
            Response::Resolved(r) => Ok(r),
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
        let key = c.register(ep.clone()).unwrap();
        let r = c.resolve("app", "db").unwrap();
        assert_eq!(r.endpoint, ep);
        assert_eq!(r.secret, key.pair_secret("app"));
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
