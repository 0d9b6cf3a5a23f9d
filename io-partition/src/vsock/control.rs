//! The control socket of `part-io vsock`: partd adds and removes
//! partitions (their directory entry and vhost-user socket) and reads the
//! counters, in the protocol of [`partvisor_api::vsock`].
//!
//! Requests are served one at a time, so two adds can never race for one
//! CID or socket. A client gets [`CLIENT_TIMEOUT`] per line; the socket is
//! made owner-only (mode 0600) when it is created, so only partd's user
//! reaches it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use partvisor_api::vsock::{Entry, Location, Reply, Request};
use tracing::{info, warn};

use super::bound::{self, BindError};
use super::relay::Relay;
use super::spec::{guest_cid, VsockError};
use crate::server::{self, ListenError};

/// How long a control client may take to send a request line.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request line accepted.
pub const MAX_LINE: u64 = 64 * 1024;

/// Listens on the control socket at `path`, owner-only.
pub fn listen(path: &Path) -> Result<UnixListener, ListenError> {
    let l = server::listen("control socket", path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ListenError::Bind {
            what: "control socket",
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(l)
}

/// Serves control clients on `listener`, one at a time, forever.
pub fn serve(relay: &Arc<Relay>, listener: UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => serve_client(relay, s),
            Err(e) => {
                warn!("control socket accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_client(relay: &Arc<Relay>, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut lines).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            // Longer than MAX_LINE (or cut off): answer once and hang up.
            let _ = reply(
                &mut out,
                &Reply::error("request line too long or not ended"),
            );
            return;
        }
        let r = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(relay, req),
            Err(e) => Reply::error(format!("bad request: {e}")),
        };
        if reply(&mut out, &r).is_err() {
            return;
        }
    }
}

fn reply(out: &mut UnixStream, r: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(r).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// Answers one request.
pub fn handle(relay: &Arc<Relay>, req: Request) -> Reply {
    match req {
        Request::Add(entry) => match add(relay, entry) {
            Ok(()) => Reply {
                ok: true,
                ..Reply::default()
            },
            Err(e) => Reply::error(e),
        },
        Request::Remove { cid } => {
            let removed = relay.remove(cid);
            if let Some(p) = &removed.port {
                server::wake(&p.socket);
                if let Some(h) = &p.host {
                    server::wake(&h.path);
                }
                info!(
                    cid,
                    "partition removed: {} connection(s) reset; {}",
                    removed.reset,
                    relay.summary(p)
                );
            }
            Reply {
                ok: true,
                connected: Some(removed.connected),
                reset: Some(removed.reset),
                ..Reply::default()
            }
        }
        Request::Stats => Reply {
            ok: true,
            stats: Some(relay.stats()),
            ..Reply::default()
        },
    }
}

/// Adds a partition: checks the entry, binds its socket, then makes both
/// reachable. A failed add changes nothing.
fn add(relay: &Arc<Relay>, entry: Entry) -> Result<(), AddError> {
    let bad = |why| {
        AddError::Entry(VsockError::BadEntry {
            cid: entry.cid,
            why,
        })
    };
    if guest_cid(&entry.cid.to_string()).is_none() {
        return Err(bad("not a guest CID (3 up to 2^32 - 2)"));
    }
    if entry.partition.is_empty() {
        return Err(bad("no partition name"));
    }
    let socket = match (&entry.location, &entry.socket) {
        (Location::Local, Some(s)) => Some(s.clone()),
        (Location::Local, None) => return Err(bad("a local partition needs a socket")),
        (Location::Remote { .. }, None) if entry.host_socket.is_none() => None,
        (Location::Remote { .. }, _) => {
            return Err(bad(
                "a remote partition is not served here; give no socket and no host socket",
            ))
        }
    };
    let update = relay.check_entry(&entry).map_err(AddError::Entry)?;
    let cid = entry.cid;
    // An update keeps its port (and host socket); a remote partition has
    // none here.
    let Some(socket) = socket.filter(|_| !update) else {
        relay.set_entry(entry);
        return Ok(());
    };
    let memory = entry.memory_mib.and_then(|m| m.checked_mul(1 << 20));
    let bound = bound::bind(
        relay,
        cid,
        socket.clone(),
        entry.host_socket.clone(),
        memory,
        entry.frontend_uid,
    )?;
    let host = entry.host_socket.clone();
    relay.set_entry(entry);
    bound.spawn()?;
    match host {
        Some(h) => info!(
            "vsock CID {cid} serving on {}, host services on {}",
            socket.display(),
            h.display()
        ),
        None => info!("vsock CID {cid} serving on {}", socket.display()),
    }
    Ok(())
}

/// Why an `add` failed.
#[derive(Debug, thiserror::Error)]
enum AddError {
    #[error(transparent)]
    Entry(VsockError),
    #[error(transparent)]
    Bind(#[from] BindError),
}
