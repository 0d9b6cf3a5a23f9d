//! Hybrid vsock: a partition's guest sockets to and from host processes
//! over Unix sockets, compatible with Firecracker and Cloud Hypervisor:
//!
//! - a host process connects to the partition's host socket `PATH` and
//!   writes `CONNECT <port>\n`; part-io opens a connection to the guest's
//!   port from CID 2 and a fresh host port (from 2^30 up) and answers
//!   `OK <host port>\n` once the guest accepted (the stream is closed if it
//!   refused or did not answer within [`CONNECT_TIMEOUT`]);
//! - a guest connecting to CID 2 port P reaches a host listener at
//!   `PATH_P`; no listener there is a RST to the guest.
//!
//! part-io is the vsock end of these connections towards the guest: it
//! keeps the guest to the credit it advertises ([`conn::HOST_BUF`]) and
//! never sends the guest more than the guest's credit. A partition has at
//! most [`HOST_LIMIT`] hybrid connections; a host process that does not
//! read stalls only its own connection.
//!
//! Guests never reach each other this way: CID 2 is the host, and which
//! host listeners exist is the host's choice.

pub mod conn;
pub mod listen;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use partvisor_runtime::sync::MutexExt;
use tracing::warn;

use self::conn::{HostConn, Phase};
use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::relay::{Payload, Relay, VsockPort};
use super::spec::VsockError;
use super::stats::VsockStats;
use crate::chain::Malformed;

/// Hybrid connections one partition may have open (or being opened).
pub const HOST_LIMIT: usize = 64;
/// How long a host-initiated connection waits for the guest's answer, and a
/// host process for its `CONNECT` line.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long what a guest sent before its RST may take to reach a host
/// process that is slow to read.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// First host port given to host-initiated connections (as Firecracker).
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
pub const MAX_PATH: usize = 107;

/// One partition's hybrid side: its host socket and connections.
pub struct HostSide {
    /// The host socket (`uds_path`); guest -> host port P goes to `PATH_P`.
    pub path: PathBuf,
    conns: Mutex<HashMap<(u32, u32), Arc<HostConn>>>,
    next_port: AtomicU32,
    /// Host processes between accept and the end of their handshake.
    pending: AtomicUsize,
    /// The host listener stops at its next accept.
    pub(super) retired: AtomicBool,
}

/// Why a hybrid connection was refused (counted and logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostRefusal {
    #[error("the partition has {HOST_LIMIT} hybrid connections open")]
    Limit,
    #[error("a connection between these ports is open already")]
    Duplicate,
}

impl HostSide {
    /// A hybrid side at `path`, with no connections; `path` must leave room
    /// for the `_PORT` suffix of guest-initiated connections.
    pub fn new(path: PathBuf) -> Result<HostSide, VsockError> {
        if !check_path(&path) {
            return Err(VsockError::HostSocketTooLong(path));
        }
        Ok(HostSide {
            path,
            conns: Mutex::new(HashMap::new()),
            next_port: AtomicU32::new(FIRST_HOST_PORT),
            pending: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        })
    }

    /// Where a guest connecting to host port `port` is sent.
    pub fn listener_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{port}"));
        p.into()
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        let mut conns = self.conns.locked();
        conns.retain(|_, c| c.lock().phase != Phase::Closed);
        conns.len()
    }

    /// Registers `conn` (keyed by guest port and host port), unless the
    /// partition is at its limit or the pair is taken.
    fn insert(&self, conn: &Arc<HostConn>) -> Result<(), HostRefusal> {
        let mut conns = self.conns.locked();
        conns.retain(|_, c| c.lock().phase != Phase::Closed);
        let key = (conn.guest.port, conn.host.port);
        if conns.contains_key(&key) {
            return Err(HostRefusal::Duplicate);
        }
        if conns.len() >= HOST_LIMIT {
            return Err(HostRefusal::Limit);
        }
        conns.insert(key, conn.clone());
        Ok(())
    }

    fn get(&self, guest_port: u32, host_port: u32) -> Option<Arc<HostConn>> {
        let conns = self.conns.locked();
        conns
            .get(&(guest_port, host_port))
            .filter(|c| c.lock().phase != Phase::Closed)
            .cloned()
    }

    /// A host port for a host-initiated connection, not used by another
    /// (at most [`HOST_LIMIT`] are, so this ends).
    fn allocate_port(&self) -> u32 {
        loop {
            let p = self.next_port.fetch_add(1, Ordering::Relaxed);
            if p < FIRST_HOST_PORT || p == u32::MAX {
                self.next_port.store(FIRST_HOST_PORT, Ordering::Relaxed);
                continue;
            }
            let taken = self.conns.locked().keys().any(|(_, h)| *h == p);
            if !taken {
                return p;
            }
        }
    }

    /// Ends every connection (the guest is gone or its port removed); the
    /// guest is not told.
    pub fn close_all(&self) {
        let conns: Vec<Arc<HostConn>> = self.conns.locked().drain().map(|(_, c)| c).collect();
        for c in conns {
            c.close();
        }
    }

    /// A packet from the guest (`port`) to CID 2.
    pub fn from_guest(
        &self,
        relay: &Arc<Relay>,
        port: &Arc<VsockPort>,
        h: &Header,
        payload: Payload<'_>,
    ) {
        let stats = &port.stats;
        let Some(conn) = self.get(h.src.port, h.dst.port) else {
            match h.op {
                Op::Request => self.connect_to_host(relay, port, h),
                // A RST nobody holds needs no answer.
                Op::Rst => {}
                _ => {
                    VsockStats::bump(&stats.host_protocol_errors);
                    let _ = relay.deliver(port, &h.reset_reply(), Payload::None);
                }
            }
            return;
        };
        let mut s = conn.lock();
        if s.guest_reset {
            // The guest ended it already; what it still sends is stale.
            return;
        }
        if let Err(e) = s.to_guest.receiver_update(h.buf_alloc, h.fwd_cnt) {
            drop(s);
            VsockStats::bump(&stats.host_credit_violations);
            self.reset(relay, port, &conn, &format!("credit rule broken: {e}"));
            return;
        }
        match (h.op, s.phase) {
            (Op::Response, Phase::Connecting) if conn.host_initiated => {
                s.phase = Phase::Open;
            }
            // What it sent before still reaches the host process, unless
            // that process stops reading: then the drain gives up after
            // DRAIN_TIMEOUT and the connection closes.
            (Op::Rst, Phase::Open) => {
                s.guest_reset = true;
                conn.limit_drain(DRAIN_TIMEOUT);
            }
            (Op::Rst, _) => {
                drop(s);
                conn.close();
                return;
            }
            (Op::Rw, Phase::Open) if !s.guest_done_sending => {
                if let Err(e) = s.from_guest.send(h.len) {
                    drop(s);
                    VsockStats::bump(&stats.host_credit_violations);
                    self.reset(relay, port, &conn, &format!("credit rule broken: {e}"));
                    return;
                }
                let at = s.to_host.len();
                s.to_host.resize(at + h.len as usize, 0);
                if payload.read_into(0, &mut s.to_host[at..]).is_err() {
                    drop(s);
                    stats.count_malformed(Malformed::BadAddress);
                    self.reset(relay, port, &conn, "payload outside guest memory");
                    return;
                }
            }
            (Op::CreditUpdate, Phase::Open) => {}
            (Op::CreditRequest, Phase::Open) => {
                drop(s);
                conn.changed.notify_all();
                conn.tell(relay, port, Op::CreditUpdate, 0);
                return;
            }
            (Op::Shutdown, Phase::Open) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    s.guest_done_sending = true;
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    s.guest_closing = true;
                }
            }
            _ => {
                drop(s);
                VsockStats::bump(&stats.host_protocol_errors);
                self.reset(
                    relay,
                    port,
                    &conn,
                    "packet not valid in the connection's state",
                );
                return;
            }
        }
        drop(s);
        conn.changed.notify_all();
    }

    /// Resets `conn` at both ends and logs why.
    fn reset(&self, relay: &Relay, port: &VsockPort, conn: &HostConn, why: &str) {
        let n = VsockStats::bump(&port.stats.host_resets);
        if n <= 8 || n.is_power_of_two() {
            warn!(port = %port.socket.display(), cid = port.cid, "hybrid connection {} <-> {}: {why}; reset ({n} so far)", conn.guest, conn.host);
        }
        conn.close();
        conn.tell(relay, port, Op::Rst, 0);
    }

    /// A guest REQUEST to host port P: connects to `PATH_P` without
    /// waiting (a listener that is not accepting refuses at once instead
    /// of stalling the guest's transmit queue), answers RESPONSE or RST,
    /// and moves the connection's bytes in threads of its own.
    fn connect_to_host(&self, relay: &Arc<Relay>, port: &Arc<VsockPort>, h: &Header) {
        let conn = HostConn::new(h.src, h.dst.port, false);
        let _ = conn.lock().to_guest.receiver_update(h.buf_alloc, h.fwd_cnt);
        if let Err(why) = self.insert(&conn) {
            self.refuse(relay, port, h, &why.to_string());
            return;
        }
        let path = self.listener_path(h.dst.port);
        let stream = match connect_now(&path) {
            Ok(s) => s,
            Err(e) => {
                conn.close();
                let why = match e.raw_os_error() {
                    Some(libc::EAGAIN) => format!(
                        "the listener at {} is not accepting (backlog full)",
                        path.display()
                    ),
                    _ => format!("no listener at {}: {e}", path.display()),
                };
                self.refuse(relay, port, h, &why);
                return;
            }
        };
        if !conn.open_with(stream) || !conn.tell(relay, port, Op::Response, 0) {
            conn.close();
            return;
        }
        VsockStats::bump(&port.stats.host_connections);
        let (r, p, c) = (relay.clone(), port.clone(), conn.clone());
        let spawned = std::thread::Builder::new()
            .name("part-io-hybrid".into())
            .spawn(move || run(&c, &r, &p));
        if let Err(e) = spawned {
            self.reset(relay, port, &conn, &format!("cannot start a thread: {e}"));
        }
    }

    /// Refuses a guest REQUEST with a RST; counted and logged.
    fn refuse(&self, relay: &Relay, port: &VsockPort, h: &Header, why: &str) {
        let n = VsockStats::bump(&port.stats.host_refused);
        if n <= 8 || n.is_power_of_two() {
            warn!(port = %port.socket.display(), cid = port.cid, "guest {} -> host port {}: {why}; reset ({n} refused so far)", h.src, h.dst.port);
        }
        let _ = relay.deliver(port, &h.reset_reply(), Payload::None);
    }
}

/// Both directions of an open connection: the writer in a thread of its
/// own, the reader in the calling thread.
pub(super) fn run(conn: &Arc<HostConn>, relay: &Arc<Relay>, port: &Arc<VsockPort>) {
    let (c, r, p) = (conn.clone(), relay.clone(), port.clone());
    let writer = std::thread::Builder::new()
        .name("part-io-hybrid-w".into())
        .spawn(move || conn::write_loop(&c, &r, &p));
    match writer {
        Ok(w) => {
            conn::read_loop(conn, relay, port);
            let _ = w.join();
        }
        Err(_) => {
            conn.close();
            conn.tell(relay, port, Op::Rst, 0);
        }
    }
}

/// A connected stream to the listener at `path`, or the error at once: a
/// non-blocking connect on a Unix socket either completes or fails
/// (`EAGAIN` when the listener's backlog is full); it never waits.
fn connect_now(path: &Path) -> std::io::Result<UnixStream> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.connect(&socket2::SockAddr::unix(path)?)?;
    s.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(s)))
}

/// Whether `path` leaves room for the longest `_PORT` suffix.
pub fn check_path(path: &Path) -> bool {
    path.as_os_str().len() + "_4294967295".len() <= MAX_PATH
}
