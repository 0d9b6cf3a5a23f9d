//! A partition's host socket: host processes connect to it and open a
//! connection to a guest port with `CONNECT <port>\n`; part-io answers
//! `OK <host port>\n` once the guest accepted, and from then on the stream
//! carries the connection's bytes both ways.
//!
//! A host process gets [`CONNECT_TIMEOUT`] for its line (at most
//! [`MAX_LINE`] bytes); at most [`HOST_LIMIT`] may be in their handshake at
//! once, and a partition's open connections are capped the same way, so a
//! host process that floods the socket is refused without threads or
//! memory growing. The socket is owner-only (mode 0600): host services run
//! as partd's user, or the operator opens it up on purpose.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use partvisor_runtime::sync::CondvarExt;
use tracing::{debug, warn};

use super::conn::{HostConn, Phase};
use super::{run, HostSide, CONNECT_TIMEOUT, HOST_LIMIT};
use crate::server::{self, ListenError};
use crate::vsock::packet::{Addr, Op};
use crate::vsock::relay::{Relay, VsockPort};
use crate::vsock::stats::VsockStats;

/// Longest `CONNECT` line read.
pub const MAX_LINE: usize = 64;

/// Binds `side`'s host socket, owner-only.
pub fn bind(side: &HostSide) -> Result<UnixListener, ListenError> {
    let l = server::listen("host socket", &side.path)?;
    std::fs::set_permissions(&side.path, std::fs::Permissions::from_mode(0o600)).map_err(
        |source| ListenError::Bind {
            what: "host socket",
            path: side.path.clone(),
            source,
        },
    )?;
    Ok(l)
}

/// Accepts host processes on `listener` until `port`'s host side is
/// retired (see [`server::wake`]); each handshake runs in a thread of its
/// own.
pub fn serve(listener: UnixListener, relay: Arc<Relay>, port: Arc<VsockPort>) {
    let Some(side) = port.host.as_ref() else {
        return;
    };
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(socket = %side.path.display(), "host socket accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if side.retired.load(Ordering::SeqCst) {
            return;
        }
        if side.pending.fetch_add(1, Ordering::SeqCst) >= HOST_LIMIT {
            side.pending.fetch_sub(1, Ordering::SeqCst);
            refused(
                &port,
                side,
                &format!("{HOST_LIMIT} host processes are in their handshake already"),
            );
            continue;
        }
        let (r, p) = (relay.clone(), port.clone());
        let spawned = std::thread::Builder::new()
            .name("part-io-hybrid".into())
            .spawn(move || {
                let conn = handshake(stream, &r, &p);
                if let Some(side) = p.host.as_ref() {
                    side.pending.fetch_sub(1, Ordering::SeqCst);
                }
                if let Some(conn) = conn {
                    run(&conn, &r, &p);
                }
            });
        if let Err(e) = spawned {
            side.pending.fetch_sub(1, Ordering::SeqCst);
            refused(&port, side, &format!("cannot start a thread: {e}"));
        }
    }
}

fn refused(port: &VsockPort, side: &HostSide, why: &str) {
    let n = VsockStats::bump(&port.stats.host_refused);
    if n <= 8 || n.is_power_of_two() {
        warn!(socket = %side.path.display(), cid = port.cid, "host process refused: {why} ({n} refused so far)");
    }
}

fn bad_line(port: &VsockPort, side: &HostSide, why: &str) {
    let n = VsockStats::bump(&port.stats.host_protocol_errors);
    if n <= 8 || n.is_power_of_two() {
        warn!(socket = %side.path.display(), cid = port.cid, "host process: {why}; expected `CONNECT <port>\\n`; closed ({n} so far)");
    }
}

/// Reads the `CONNECT` line one byte at a time (what follows it belongs to
/// the connection).
fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>, &'static str> {
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut b = [0u8; 1];
    loop {
        match stream.read(&mut b) {
            Ok(0) => return Err("closed before the end of its line"),
            Ok(_) if b[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() == MAX_LINE => return Err("line too long"),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err("no line within the timeout"),
        }
    }
}

/// The guest port of a `CONNECT <port>` line.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = text.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Reads the line, asks the guest, and answers the host process; the open
/// connection, or `None` (the stream is closed) if anything failed.
fn handshake(mut stream: UnixStream, relay: &Relay, port: &VsockPort) -> Option<Arc<HostConn>> {
    let side = port.host.as_ref()?;
    let _ = stream.set_read_timeout(Some(CONNECT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CONNECT_TIMEOUT));
    let guest_port = match read_line(&mut stream) {
        Ok(line) => match parse_connect(&line) {
            Some(p) => p,
            None => {
                bad_line(
                    port,
                    side,
                    &format!("sent {:?}", String::from_utf8_lossy(&line)),
                );
                return None;
            }
        },
        Err(why) => {
            bad_line(port, side, why);
            return None;
        }
    };
    let guest = Addr {
        cid: u64::from(port.cid),
        port: guest_port,
    };
    let conn = HostConn::new(guest, side.allocate_port(), true);
    if let Err(why) = side.insert(&conn) {
        refused(port, side, &format!("CONNECT {guest_port}: {why}"));
        return None;
    }
    if !conn.tell(relay, port, Op::Request, 0) {
        conn.close();
        refused(
            port,
            side,
            &format!("CONNECT {guest_port}: the guest's vsock device is not running"),
        );
        return None;
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut s = conn.lock();
    while s.phase == Phase::Connecting {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s = conn.changed.wait_timeout_locked(s, left).0;
    }
    let phase = s.phase;
    drop(s);
    match phase {
        Phase::Open => {}
        Phase::Connecting => {
            conn.close();
            conn.tell(relay, port, Op::Rst, 0);
            refused(
                port,
                side,
                &format!(
                    "CONNECT {guest_port}: the guest did not answer within {CONNECT_TIMEOUT:?}"
                ),
            );
            return None;
        }
        Phase::Closed => {
            // The guest refused (nothing listens there): as Firecracker,
            // the host process sees its stream closed.
            debug!(socket = %side.path.display(), "CONNECT {guest_port}: refused by the guest");
            return None;
        }
    }
    let ok = format!("OK {}\n", conn.host.port);
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    if stream.write_all(ok.as_bytes()).is_err() || !conn.open_with(stream) {
        conn.close();
        conn.tell(relay, port, Op::Rst, 0);
        return None;
    }
    VsockStats::bump(&port.stats.host_connections);
    Some(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_and_anything_else_is_refused() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +5",
            b"CONNECT 4294967296",
            b"connect 5",
            b"CONNECT 5 6",
            b"\xffCONNECT 5",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
