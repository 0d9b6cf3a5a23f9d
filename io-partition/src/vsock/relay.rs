//! The relay: every partition's vsock port, the connection table, and the
//! delivery of a packet into a receiver's rx buffers.
//!
//! Delivery never waits. A packet goes straight from the sender's tx
//! buffers into the receiver's rx buffers (one copy); a RW larger than one
//! rx buffer is split across several, each with its own header. If the
//! receiver has no buffer posted, what is left is copied into that port's
//! queue and delivered when it posts more. The queue cannot grow past what
//! receivers advertised: the table charges every RW against the receiver's
//! credit, whose `buf_alloc` it caps, so it holds at most
//! `MAX_BUF_ALLOC` bytes per connection.
//!
//! Locks: the table's lock is held only for one decision; a port's `rx`
//! lock (then its vring lock) only while delivering to it. A thread never
//! holds two ports' `rx` locks, nor the table lock while delivering.

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use partvisor_api::vsock::Entry;
use partvisor_runtime::sync::{MutexExt, RwLockExt};
use tracing::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::directory::Entries;
use super::hybrid::HostSide;
use super::packet::{Header, Op, HDR_LEN, HOST_CID};
use super::spec::VsockError;
use super::stats::VsockStats;
use super::table::{Action, Event, Table};
use super::{MAX_QUEUE_SIZE, TABLE_LIMIT};
use crate::chain::{gather, ChainWalker, Malformed, Segment};
use crate::copy::{push_range, Cursor};
use crate::server::Mem;

/// Where a packet's payload is.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    /// No payload (`len` 0).
    None,
    /// In the sender's guest memory, exactly `len` bytes in these segments.
    Guest {
        mem: &'a GuestMemoryMmap<()>,
        segs: &'a [Segment],
    },
    /// In part-io's memory (queued earlier).
    Bytes(&'a [u8]),
}

impl Payload<'_> {
    /// Appends bytes `off..off + n` to `out`.
    fn put(
        &self,
        off: usize,
        n: usize,
        out: &mut Cursor<'_>,
        scratch: &mut Vec<Segment>,
    ) -> Result<(), ()> {
        match self {
            Payload::None => Ok(()),
            Payload::Bytes(b) => out.put(b.get(off..off + n).ok_or(())?),
            Payload::Guest { mem, segs } => {
                scratch.clear();
                push_range(segs, off, n, scratch);
                out.put_guest(mem, scratch)
            }
        }
    }

    /// Bytes `off..off + out.len()` copied into `out`.
    pub(super) fn read_into(&self, off: usize, out: &mut [u8]) -> Result<(), ()> {
        match self {
            Payload::None if out.is_empty() => Ok(()),
            Payload::None => Err(()),
            Payload::Bytes(b) => {
                out.copy_from_slice(b.get(off..off + out.len()).ok_or(())?);
                Ok(())
            }
            Payload::Guest { mem, segs } => gather(*mem, segs, off, out).map_err(|_| ()),
        }
    }

    /// Bytes `off..off + n` copied out.
    fn copy(&self, off: usize, n: usize) -> Result<Vec<u8>, ()> {
        let mut v = vec![0u8; n];
        self.read_into(off, &mut v)?;
        Ok(v)
    }
}

/// A port's receive ring, published by its connection once the frontend
/// has set up its queues; cleared when the connection ends.
pub(super) struct RxPath {
    pub(super) vring: VringRwLock,
    pub(super) mem: Mem,
}

/// A packet waiting for receive buffers.
struct Queued {
    header: Header,
    payload: Vec<u8>,
}

#[derive(Default)]
struct Rx {
    path: Option<RxPath>,
    walker: Option<ChainWalker>,
    queue: VecDeque<Queued>,
    scratch: Vec<Segment>,
}

/// One partition's vsock device.
pub struct VsockPort {
    /// The partition's CID (its config space, and the only source it may
    /// send from).
    pub cid: u32,
    /// The vhost-user socket part-io listens on.
    pub socket: PathBuf,
    /// Its hybrid host socket and connections, if it has one.
    pub host: Option<HostSide>,
    /// The partition's granted memory in bytes, if partd gave it.
    pub memory_limit: Option<u64>,
    /// The only uid whose frontend may connect, if partd gave it.
    pub frontend_uid: Option<u32>,
    pub stats: VsockStats,
    rx: Mutex<Rx>,
    pub(super) connected: AtomicBool,
    /// Taken out of the relay: its listener stops at the next accept.
    pub(super) retired: AtomicBool,
}

impl VsockPort {
    /// A port for `cid` served on `socket`, with host services on `host`.
    pub fn new(
        cid: u32,
        socket: PathBuf,
        host: Option<HostSide>,
        memory_limit: Option<u64>,
        frontend_uid: Option<u32>,
    ) -> Arc<VsockPort> {
        Arc::new(VsockPort {
            cid,
            socket,
            host,
            memory_limit,
            frontend_uid,
            stats: VsockStats::default(),
            rx: Mutex::new(Rx::default()),
            connected: AtomicBool::new(false),
            retired: AtomicBool::new(false),
        })
    }

    /// Whether a frontend is attached.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// What taking a partition out of the relay did.
#[derive(Debug, Default)]
pub struct Removed {
    /// Its port, if it had one here (its listener is the caller's to stop).
    pub port: Option<Arc<VsockPort>>,
    /// Connections reset.
    pub reset: u64,
    /// Whether a frontend of that CID (this port or one removed earlier) is
    /// still attached.
    pub connected: bool,
}

impl std::fmt::Debug for VsockPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockPort")
            .field("cid", &self.cid)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Every port of one `part-io vsock`, the directory and the connections.
pub struct Relay {
    ports: RwLock<HashMap<u64, Arc<VsockPort>>>,
    /// Ports taken out while their frontend was still attached.
    retired: Mutex<Vec<Arc<VsockPort>>>,
    table: Mutex<Table>,
    directory: RwLock<Entries>,
}

impl Relay {
    /// A relay with `directory` and no ports.
    pub fn new(directory: Entries) -> Arc<Relay> {
        Arc::new(Relay {
            ports: RwLock::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            table: Mutex::new(Table::new(TABLE_LIMIT)),
            directory: RwLock::new(directory),
        })
    }

    /// Makes `port` reachable (its CID's directory entry is the caller's).
    /// Returns the port it replaced, if any.
    pub fn insert_port(&self, port: Arc<VsockPort>) -> Option<Arc<VsockPort>> {
        self.ports.write_locked().insert(u64::from(port.cid), port)
    }

    /// Checks `entry` against the directory (see [`Entries::check`]);
    /// `Ok(true)` when it only updates an entry already there.
    pub fn check_entry(&self, entry: &Entry) -> Result<bool, VsockError> {
        let d = self.directory.read_locked();
        d.check(entry.cid, &entry.partition, entry.socket.as_deref())
    }

    /// Adds or replaces a directory entry.
    pub fn set_entry(&self, entry: Entry) {
        self.directory.write_locked().insert(entry);
    }

    /// Takes partition `cid` out: its directory entry and port go, and every
    /// connection it was an end of is reset at the other end.
    pub fn remove(&self, cid: u32) -> Removed {
        self.directory.write_locked().remove(cid);
        let port = self.ports.write_locked().remove(&u64::from(cid));
        if let Some(p) = &port {
            p.retired.store(true, Ordering::SeqCst);
            if let Some(h) = &p.host {
                h.retired.store(true, Ordering::SeqCst);
                h.close_all();
            }
        }
        let resets = self.table.locked().partition_gone(u64::from(cid));
        let reset = resets.len() as u64;
        for a in resets {
            let _ = self.act(&a, Payload::None);
        }
        let mut retired = self.retired.locked();
        if let Some(p) = &port {
            retired.push(p.clone());
        }
        retired.retain(|p| p.is_connected());
        let connected = retired.iter().any(|p| p.cid == cid);
        Removed {
            port,
            reset,
            connected,
        }
    }

    /// The ports, by CID.
    pub fn ports(&self) -> Vec<Arc<VsockPort>> {
        let mut v: Vec<Arc<VsockPort>> = self.ports.read_locked().values().cloned().collect();
        v.sort_by_key(|p| p.cid);
        v
    }

    /// One line with every counter of `port`.
    pub fn summary(&self, port: &VsockPort) -> String {
        let t = self.table.locked().counters(u64::from(port.cid));
        port.stats.summary(&t)
    }

    /// Every port's counters as one JSON value:
    /// `{"ports": [{"cid": N, "socket": PATH, "connected": bool, "rx_ready": bool, COUNTER: N, ...}]}`.
    pub fn stats(&self) -> serde_json::Value {
        let ports: Vec<serde_json::Value> = self
            .ports()
            .iter()
            .map(|p| {
                let t = self.table.locked().counters(u64::from(p.cid));
                let mut m = serde_json::Map::new();
                m.insert("cid".into(), p.cid.into());
                m.insert("socket".into(), p.socket.display().to_string().into());
                m.insert("connected".into(), p.is_connected().into());
                m.insert("rx_ready".into(), p.rx.locked().path.is_some().into());
                if let Some(h) = &p.host {
                    m.insert("host_socket".into(), h.path.display().to_string().into());
                    m.insert("host_open".into(), h.open().into());
                }
                for (k, v) in p.stats.counters(&t) {
                    m.insert(k.into(), v.into());
                }
                serde_json::Value::Object(m)
            })
            .collect();
        serde_json::json!({ "ports": ports })
    }

    /// [`Relay::stats`] as one line of text.
    pub fn stats_json(&self) -> String {
        self.stats().to_string()
    }

    /// Makes `port`'s receive ring reachable.
    pub(super) fn publish_rx(&self, port: &VsockPort, path: RxPath) {
        let mut rx = port.rx.locked();
        rx.path = Some(path);
        rx.walker = Some(ChainWalker::new(MAX_QUEUE_SIZE));
        tracing::info!(port = %port.socket.display(), cid = port.cid, "vsock receive queue ready");
    }

    /// `port`'s frontend is gone: its connections end (the other ends get
    /// a RST) and what was queued for it is dropped. A port taken out of
    /// the relay whose CID has a new port already leaves the new port's
    /// connections alone.
    pub(super) fn port_gone(&self, port: &Arc<VsockPort>) {
        {
            let mut rx = port.rx.locked();
            rx.path = None;
            rx.queue.clear();
            port.stats.queued_bytes.store(0, Ordering::Relaxed);
        }
        if let Some(h) = &port.host {
            h.close_all();
        }
        let current = self.ports.read_locked().get(&u64::from(port.cid)).cloned();
        if current.is_some_and(|c| !Arc::ptr_eq(&c, port)) {
            return;
        }
        let resets = self.table.locked().partition_gone(u64::from(port.cid));
        for a in resets {
            // A peer without a receive queue has nothing to reset.
            let _ = self.act(&a, Payload::None);
        }
    }

    /// Runs `header` (checked, from `port`) through the table and
    /// delivers what it says; `payload` is the RW payload in the sender's
    /// memory.
    pub(super) fn relay(
        self: &Arc<Self>,
        port: &Arc<VsockPort>,
        header: &Header,
        payload: Payload<'_>,
    ) {
        if header.dst.cid == HOST_CID {
            if let Some(host) = &port.host {
                host.from_guest(self, port, header, payload);
                return;
            }
        }
        let (outcome, expired) = {
            let mut table = self.table.locked();
            let expired = if header.op == Op::Request {
                table.expire(Instant::now())
            } else {
                Vec::new()
            };
            let directory = self.directory.read_locked();
            (table.packet(header, &*directory), expired)
        };
        for a in &expired {
            let _ = self.act(a, Payload::None);
        }
        if let Some(e) = outcome.event {
            // Logged at first, then at powers of two: a flooding guest
            // cannot flood the log.
            let n = VsockStats::bump(&port.stats.table_events);
            if n <= 8 || n.is_power_of_two() {
                warn!(port = %port.socket.display(), cid = port.cid, "{} -> {} {:?}: {} ({n} refusals and resets so far)", header.src, header.dst, header.op, describe(&e));
            }
        }
        for a in &outcome.actions {
            let p = match a {
                Action::Forward { .. } if outcome.deliver_payload => payload,
                _ => Payload::None,
            };
            if let (Action::Forward { .. }, true) = (a, outcome.deliver_payload) {
                VsockStats::bump(&port.stats.tx_packets);
                port.stats
                    .tx_bytes
                    .fetch_add(u64::from(header.len), Ordering::Relaxed);
            }
            if !self.act(a, p) {
                if let Action::Forward { header, .. } = a {
                    // A RST nobody can receive needs no answer.
                    if header.op == Op::Rst {
                        continue;
                    }
                    let rst = self.table.locked().undeliverable(header);
                    let _ = self.act(&rst, Payload::None);
                }
            }
        }
    }

    /// Delivers one action's packet; false if its receiver cannot take
    /// packets (unknown, or no receive queue yet).
    fn act(&self, a: &Action, payload: Payload<'_>) -> bool {
        let (Action::Forward { to, header } | Action::Reset { to, header }) = a;
        let port = self.ports.read_locked().get(to).cloned();
        match port {
            Some(p) => self.deliver(&p, header, payload),
            None => false,
        }
    }

    /// Puts `header` and its payload into `port`'s rx buffers, queueing
    /// what does not fit now.
    pub(super) fn deliver(&self, port: &VsockPort, header: &Header, payload: Payload<'_>) -> bool {
        let mut rx = port.rx.locked();
        if rx.path.is_none() {
            return false;
        }
        let filled = if rx.queue.is_empty() {
            fill(port, &mut rx, header, payload)
        } else {
            Filled::default()
        };
        if filled.complete(header) {
            return true;
        }
        let len = header.len as usize;
        match payload.copy(filled.bytes, len - filled.bytes) {
            Ok(rest) => {
                let mut h = *header;
                h.len = rest.len() as u32;
                port.stats
                    .queued_bytes
                    .fetch_add(rest.len() as u64, Ordering::Relaxed);
                rx.queue.push_back(Queued {
                    header: h,
                    payload: rest,
                });
                pump(port, &mut rx);
            }
            Err(()) => {
                port.stats.count_malformed(Malformed::BadAddress);
            }
        }
        true
    }

    /// `port` posted receive buffers: delivers what was queued.
    pub(super) fn flush(&self, port: &VsockPort) {
        let mut rx = port.rx.locked();
        pump(port, &mut rx);
    }
}

/// Delivers the port's queue until it is empty or the receiver has no
/// buffer left; in that case asks the driver to notify the next buffer it
/// posts (with EVENT_IDX the driver would not kick otherwise), checking
/// once more for buffers posted in between.
fn pump(port: &VsockPort, rx: &mut Rx) {
    loop {
        while let Some(mut q) = rx.queue.pop_front() {
            let filled = fill(port, rx, &q.header, Payload::Bytes(&q.payload));
            port.stats
                .queued_bytes
                .fetch_sub(filled.bytes as u64, Ordering::Relaxed);
            if !filled.complete(&q.header) {
                q.payload.drain(..filled.bytes);
                q.header.len = q.payload.len() as u32;
                rx.queue.push_front(q);
                break;
            }
        }
        let Some(path) = rx.path.as_ref() else {
            return;
        };
        if rx.queue.is_empty() {
            return;
        }
        match path.vring.enable_notification() {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => {
                warn!(port = %port.socket.display(), "cannot enable receive notifications: {e}");
                return;
            }
        }
    }
}

/// What [`fill`] put into a receiver's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Filled {
    /// Payload bytes.
    bytes: usize,
    /// Packets (buffers used with a header in them).
    packets: usize,
}

impl Filled {
    /// Whether all of `header`'s packet went in (a packet without payload
    /// needs one buffer).
    fn complete(&self, header: &Header) -> bool {
        if header.len == 0 {
            self.packets > 0
        } else {
            self.bytes == header.len as usize
        }
    }
}

fn describe(e: &Event) -> String {
    match e {
        Event::Refused(r) => format!("refused: {r}"),
        Event::Credit(c) => format!("credit rule broken: {c}; connection reset"),
        Event::Protocol => "not valid in the connection's state; connection reset".into(),
        Event::NoConnection => "no such connection; answered with a reset".into(),
    }
}

/// Fills the port's rx buffers with `header` and its payload, one packet
/// per buffer, until it is all in or the buffers run out; signals the
/// receiver if it used any buffer.
fn fill(port: &VsockPort, rx: &mut Rx, header: &Header, payload: Payload<'_>) -> Filled {
    let mut filled = Filled::default();
    let Rx {
        path,
        walker,
        scratch,
        ..
    } = rx;
    let (Some(path), Some(walker)) = (path.as_ref(), walker.as_mut()) else {
        return filled;
    };
    let mem = path.mem.memory();
    let mut state = path.vring.get_mut();
    let queue = state.get_queue_mut();
    let desc_table = GuestAddress(queue.desc_table());
    let queue_size = queue.size();
    let len = header.len as usize;
    let mut used = false;
    let name = port.socket.display();
    while !filled.complete(header) {
        let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
            break;
        };
        let head = chain.head_index();
        let used_len = match walker.walk_segments(&*mem, desc_table, queue_size, head) {
            Err(Malformed::BadHead) => {
                // No used entry can name a head outside the queue.
                port.stats.count_malformed(Malformed::BadHead);
                continue;
            }
            Err(kind) => {
                let n = port.stats.count_malformed(kind);
                if n <= 8 || n.is_power_of_two() {
                    warn!(port = %name, "malformed receive chain (head {head}): {}; returned with length 0 ({n} so far)", kind.name());
                }
                0
            }
            Ok(()) => {
                let segs = walker.segments();
                let room: usize = segs.iter().map(|s| s.len as usize).sum();
                if segs.iter().any(|s| !s.write) || room <= HDR_LEN {
                    let n = VsockStats::bump(&port.stats.bad_rx_buffer);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(port = %name, "receive buffer (head {head}, {room} bytes) is not device-writable or has no room past the {HDR_LEN}-byte header; returned with length 0 ({n} so far)");
                    }
                    0
                } else {
                    let chunk = (len - filled.bytes).min(room - HDR_LEN);
                    let mut h = *header;
                    h.len = chunk as u32;
                    let mut out = Cursor::new(&mem, segs);
                    let ok = out
                        .put(&h.encode())
                        .and_then(|()| payload.put(filled.bytes, chunk, &mut out, scratch));
                    if ok.is_err() {
                        port.stats.count_malformed(Malformed::BadAddress);
                        0
                    } else {
                        filled.bytes += chunk;
                        filled.packets += 1;
                        VsockStats::bump(&port.stats.rx_packets);
                        port.stats
                            .rx_bytes
                            .fetch_add(chunk as u64, Ordering::Relaxed);
                        (HDR_LEN + chunk) as u32
                    }
                }
            }
        };
        match queue.add_used(&*mem, head, used_len) {
            Ok(()) => used = true,
            Err(e) => {
                // A guest's used ring it broke: rate-limited.
                static LIMIT: Limiter = Limiter::new(8, std::time::Duration::from_secs(1));
                if let Some(n) = LIMIT.allow() {
                    warn!(port = %name, "cannot add used entry: {e}{}", suppressed_note(n));
                }
            }
        }
    }
    if used {
        match queue.needs_notification(&*mem) {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    warn!(port = %name, "cannot signal the receive queue: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => warn!(port = %name, "cannot read used_event: {e}"),
        }
    }
    filled
}
