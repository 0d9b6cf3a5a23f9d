//! Named endpoints and the connection handshake.
use partvisor_runtime::sync::MutexExt;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::directory::{Directory, Endpoint};
use crate::proof::{ListenerKey, Nonce, PROOF_LEN};
use crate::types::Transport;
use crate::verbs::{poll_fds, Context, Qp};
use crate::{IcError, Result};

/// First message of a connection, server to client: the challenge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Challenge {
    pub nonce: Nonce,
}

/// The client's answer: who it is, whom it wants, and the proof
/// ([`crate::proof`]) that it holds the secret of that pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub from: String,
    pub to: String,
    pub transport: Transport,
    pub proof: [u8; PROOF_LEN],
}

/// What a connecting side knows before the challenge arrives.
pub(crate) struct Intro<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub transport: Transport,
    pub secret: &'a crate::proof::PairSecret,
}

impl Intro<'_> {
    /// The hello answering `c`.
    pub fn answer(&self, c: &Challenge) -> Hello {
        Hello {
            from: self.from.into(),
            to: self.to.into(),
            transport: self.transport,
            proof: self
                .secret
                .prove(&c.nonce, self.transport, self.from, self.to),
        }
    }
}

/// What a listener checks hellos against.
pub(crate) struct Admission<'a> {
    pub name: &'a str,
    pub allow: &'a [String],
    pub key: &'a CurrentKey,
}

/// A listener's key: the directory's current one, fetched at every
/// connection (the directory changes it when a name on the allowlist changes
/// hands, and the secrets the former holder got must stop working at once).
/// The one fetched last is used only while the directory cannot be reached.
pub(crate) struct CurrentKey {
    key: Mutex<ListenerKey>,
    directory: Arc<dyn Directory>,
}

impl CurrentKey {
    fn new(key: ListenerKey, directory: Arc<dyn Directory>) -> Self {
        CurrentKey {
            key: Mutex::new(key),
            directory,
        }
    }

    /// Whether `proof` answers `nonce` for `from` under the current key.
    fn verify(
        &self,
        name: &str,
        nonce: &Nonce,
        t: Transport,
        from: &str,
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        let key = match self.directory.key(name) {
            Ok(current) => {
                *self.key.locked() = current.clone();
                current
            }
            Err(e) => {
                tracing::warn!("{name}: cannot fetch the current key ({e}); using the last one");
                self.key.locked().clone()
            }
        };
        key.verify(nonce, t, from, name, proof)
    }
}

/// Server's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub ok: bool,
    pub reason: String,
}

/// Checks a hello against the listener's name, allowlist and key.
pub(crate) fn admit(
    hello: &Hello,
    nonce: &Nonce,
    a: &Admission<'_>,
    t: Transport,
) -> std::result::Result<(), String> {
    let name = a.name;
    if hello.to != name {
        return Err(format!("this endpoint is {name:?}, not {:?}", hello.to));
    }
    if hello.transport != t {
        return Err("transport mismatch".into());
    }
    if !a.allow.contains(&hello.from) {
        return Err(format!(
            "{:?} is not on the allowlist of {name:?}",
            hello.from
        ));
    }
    if !a.key.verify(name, nonce, t, &hello.from, &hello.proof) {
        return Err(format!(
            "no proof that the peer is {:?}: resolve {name:?} through the directory as the uid that holds {:?}",
            hello.from, hello.from
        ));
    }
    Ok(())
}

/// Distinguishes the socket files of listeners of one process.
static NEXT_SOCKET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A named endpoint accepting connections on every port.
pub struct Listener {
    ctx: Context,
    name: String,
    allow: Vec<String>,
    key: CurrentKey,
    unix: UnixListener,
    unix_path: PathBuf,
    tcp: TcpListener,
}

impl Listener {
    pub(crate) fn bind(ctx: &Context, name: &str, allow: &[&str]) -> Result<Listener> {
        if name.is_empty() || name.contains(['/', '\0']) || name.len() > 100 {
            return Err(IcError::InvalidArgument(format!(
                "endpoint name {name:?} must be 1-100 chars without '/'"
            )));
        }
        let unix_path = ctx.inner.opts.socket_dir.join(format!(
            "ic-{}-{}-{}.sock",
            std::process::id(),
            NEXT_SOCKET.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            name
        ));
        let _ = std::fs::remove_file(&unix_path);
        let unix = UnixListener::bind(&unix_path)
            .map_err(|e| IcError::io(format!("bind {}", unix_path.display()), e))?;
        let tcp = TcpListener::bind((ctx.inner.opts.tcp_bind, 0))
            .map_err(|e| IcError::io("bind tcp port", e))?;
        for r in [unix.set_nonblocking(true), tcp.set_nonblocking(true)] {
            r.map_err(|e| IcError::io("set_nonblocking", e))?;
        }
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let ep = Endpoint {
            name: name.into(),
            host_id: ctx.inner.host_id.clone(),
            shm_path: Some(unix_path.clone()),
            tcp_addr: Some(tcp.local_addr().map_err(|e| IcError::io("local_addr", e))?),
            allow: allow.clone(),
        };
        let key = ctx.inner.directory.register(ep)?;
        ctx.inner
            .listeners
            .locked()
            .push((name.into(), allow.clone()));
        Ok(Listener {
            ctx: ctx.clone(),
            name: name.into(),
            allow,
            key: CurrentKey::new(key, ctx.inner.directory.clone()),
            unix,
            unix_path,
            tcp,
        })
    }

    /// Endpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP address of the listener.
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.local_addr().ok()
    }

    /// Waits up to `timeout` for an allowed peer and connects `qp` to it.
    /// Peers that are refused (not on the allowlist, wrong name, bad fds)
    /// are answered and dropped; waiting continues. Returns the peer's name.
    pub fn accept(&self, qp: &Qp, timeout: Duration) -> Result<String> {
        qp.inner.expect_state(crate::verbs::QpState::Init)?;
        let deadline = Instant::now() + timeout;
        let admission = Admission {
            name: &self.name,
            allow: &self.allow,
            key: &self.key,
        };
        loop {
            if let Ok((s, _)) = self.unix.accept() {
                match crate::shm::accept(s, &admission) {
                    Ok((link, from)) => {
                        qp.inner.attach(Box::new(link), from.clone())?;
                        return Ok(from);
                    }
                    Err(e) => tracing::warn!("{}: refused shm peer: {e}", self.name),
                }
            }
            if let Ok((s, _)) = self.tcp.accept() {
                match crate::tcp::accept(s, &admission) {
                    Ok((link, from)) => {
                        qp.inner.attach(Box::new(link), from.clone())?;
                        return Ok(from);
                    }
                    Err(e) => tracing::warn!("{}: refused tcp peer: {e}", self.name),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(IcError::Timeout("a peer to connect"));
            }
            poll_fds(
                &[self.unix.as_raw_fd(), self.tcp.as_raw_fd()],
                left.min(Duration::from_millis(100)),
            );
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The endpoint goes, the name stays ours.
        let _ = self.ctx.inner.directory.withdraw(&self.name);
        self.ctx
            .inner
            .listeners
            .locked()
            .retain(|(n, _)| *n != self.name);
        let _ = std::fs::remove_file(&self.unix_path);
    }
}
