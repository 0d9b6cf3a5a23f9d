//! `part-io net`: an L2 learning switch whose ports are vhost-user-net
//! devices, with an optional TAP uplink.
//!
//! One process is one switch. Each `--port socket=PATH,mac=MAC` is a
//! vhost-user socket served to one frontend (a `part-vmm`) at a time, with two
//! queues (0 = receiveq, 1 = transmitq), `VIRTIO_NET_F_MAC` (config bytes 0..6
//! are the port's MAC), `VIRTIO_NET_F_STATUS` (link always up),
//! `VIRTIO_RING_F_EVENT_IDX`, no offloads and no `MRG_RXBUF`. Every buffer
//! starts with the 12-byte `virtio_net_hdr_v1` followed by one Ethernet frame
//! without FCS, 14..=1514 bytes.
//!
//! # Forwarding
//!
//! - A port may only send from its MAC (the one the resource map assigned to
//!   its partition): any other source is dropped and counted
//!   (`dropped_spoof`). Port MACs are therefore static entries of the
//!   forwarding table; addresses behind the uplink are learned from the
//!   frames the uplink delivers (aged out after [`LEARN_AGE`]).
//! - Broadcast, multicast and unknown unicast destinations flood to every
//!   other connected port and to the uplink; a known destination goes to its
//!   one port (or the uplink). A frame never goes back where it came from.
//! - Delivery never waits: the sender's worker thread puts the frame straight
//!   into the receiver's receive ring. If the receiver has no buffer posted,
//!   the frame is dropped and counted at the receiver (`dropped_full`); a
//!   unicast frame for a port with no frontend is counted as `dropped_down`.
//!   A slow guest costs its senders nothing but that drop.
//! - Separate processes are separate switches: nothing is shared between them.
//!
//! # Locking
//!
//! A transmit queue's lock is held only while frames are copied out of the
//! sender's ring into a local batch; forwarding happens after it is released
//! and takes one receiver's `rx` lock (and then its vring lock) at a time. No
//! thread ever holds two of these locks, so there is no lock order to break.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::{ChainWalker, Malformed, Segment};
use crate::server::{Endpoint, ExitFds, Mem};
use crate::tap::Tap;

/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Number of queues (one rx/tx pair; no control queue).
pub const NUM_QUEUES: usize = 2;
/// Size of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Shortest frame accepted: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Longest frame accepted: 1500-byte payload plus the Ethernet header, no FCS.
pub const MAX_FRAME: usize = 1514;
/// How long an address learned on the uplink stays known without traffic.
pub const LEARN_AGE: Duration = Duration::from_secs(300);
/// Most addresses learned on the uplink; beyond that unknown ones flood.
pub const MAX_LEARNED: usize = 4096;
/// Frames copied out of a transmit ring before they are forwarded.
const TX_BATCH: usize = 64;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
const CONFIG_LEN: usize = 12;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Group (broadcast or multicast) address: I/G bit set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    fn from_slice(b: &[u8]) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&b[..6]);
        MacAddr(m)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::BadMac(s.to_string());
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(m))
    }
}

/// Errors in `part-io net` arguments.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("port `{0}`: expected key=value pairs `socket=PATH,mac=XX:XX:XX:XX:XX:XX`")]
    Syntax(String),
    #[error("port `{spec}`: unknown key `{key}` (known: socket, mac)")]
    UnknownKey { spec: String, key: String },
    #[error("port `{spec}`: `{key}` given twice")]
    Duplicate { spec: String, key: &'static str },
    #[error("port `{0}`: missing `socket=PATH`")]
    MissingSocket(String),
    #[error("port `{0}`: missing `mac=XX:XX:XX:XX:XX:XX`")]
    MissingMac(String),
    #[error("`{0}` is not a MAC address (six two-digit hex bytes separated by ':')")]
    BadMac(String),
    #[error(
        "port MAC {0} is a multicast/broadcast or all-zero address; a port needs a unicast MAC"
    )]
    GroupMac(MacAddr),
    #[error("MAC {0} is given to two ports; every port needs its own")]
    DuplicateMac(MacAddr),
    #[error("socket {0} is used by two ports")]
    DuplicateSocket(PathBuf),
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
}

/// A parsed `--port` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// vhost-user socket part-io listens on.
    pub socket: PathBuf,
    /// The only source MAC this port may send from; also its config-space MAC.
    pub mac: MacAddr,
}

impl FromStr for PortSpec {
    type Err = NetError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut socket = None;
        let mut mac = None;
        for item in spec.split(',') {
            let dup = |key| NetError::Duplicate {
                spec: spec.to_string(),
                key,
            };
            match item.split_once('=') {
                Some(("socket", v)) if !v.is_empty() => {
                    if socket.replace(PathBuf::from(v)).is_some() {
                        return Err(dup("socket"));
                    }
                }
                Some(("mac", v)) => {
                    if mac.replace(v.parse::<MacAddr>()?).is_some() {
                        return Err(dup("mac"));
                    }
                }
                Some(("socket", _)) | None => return Err(NetError::Syntax(spec.to_string())),
                Some((k, _)) => {
                    return Err(NetError::UnknownKey {
                        spec: spec.to_string(),
                        key: k.to_string(),
                    })
                }
            }
        }
        let mac = mac.ok_or_else(|| NetError::MissingMac(spec.to_string()))?;
        if mac.is_multicast() || mac.0 == [0; 6] {
            return Err(NetError::GroupMac(mac));
        }
        Ok(PortSpec {
            socket: socket.ok_or_else(|| NetError::MissingSocket(spec.to_string()))?,
            mac,
        })
    }
}

/// Counters of one port. "tx" is what the guest sent (its transmit queue),
/// "rx" what was delivered to it (its receive queue).
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames the guest sent that the switch accepted.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (Ethernet frame, without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Frames delivered into the guest's receive queue.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames.
    pub rx_bytes: AtomicU64,
    /// Frames for this guest dropped because no receive buffer was posted.
    pub dropped_full: AtomicU64,
    /// Unicast frames for this port dropped because no frontend was attached
    /// (or its receive queue was not enabled).
    pub dropped_down: AtomicU64,
    /// Frames the guest sent from a source MAC other than the port's.
    pub dropped_spoof: AtomicU64,
    /// Frames the guest sent that were shorter than an Ethernet header,
    /// longer than 1514 bytes, or had a non-zero virtio-net header
    /// (offloads were not offered).
    pub tx_bad_frame: AtomicU64,
    /// Receive buffers too small for the frame (or not device-writable),
    /// returned with length 0; the frame is dropped.
    pub rx_bad_buffer: AtomicU64,
    /// Malformed chains, per [`Malformed`] kind (either queue).
    pub malformed: [AtomicU64; Malformed::ALL.len()],
    /// Connections refused because a memory region failed the seal check.
    pub refused_regions: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

impl PortStats {
    fn count_malformed(&self, kind: Malformed) -> u64 {
        bump(&self.malformed[kind.index()])
    }

    fn snapshot(&self) -> PortCounters {
        PortCounters {
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            dropped_full: get(&self.dropped_full),
            dropped_down: get(&self.dropped_down),
            dropped_spoof: get(&self.dropped_spoof),
            tx_bad_frame: get(&self.tx_bad_frame),
            rx_bad_buffer: get(&self.rx_bad_buffer),
            malformed: Malformed::ALL
                .iter()
                .map(|k| (k.name(), get(&self.malformed[k.index()])))
                .collect(),
            refused_regions: get(&self.refused_regions),
            connections: get(&self.connections),
        }
    }
}

/// A point-in-time copy of [`PortStats`] (the stats socket's per-port object).
#[derive(Debug, Serialize)]
pub struct PortCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub dropped_full: u64,
    pub dropped_down: u64,
    pub dropped_spoof: u64,
    pub tx_bad_frame: u64,
    pub rx_bad_buffer: u64,
    pub malformed: std::collections::BTreeMap<&'static str, u64>,
    pub refused_regions: u64,
    pub connections: u64,
}

/// Counters of the uplink. "rx" is what the host side sent into the
/// switch, "tx" what the switch wrote to the tap.
#[derive(Debug, Default, Serialize)]
pub struct UplinkCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub dropped_full: u64,
    pub dropped_spoof: u64,
    pub dropped_bad_frame: u64,
    pub errors: u64,
}

#[derive(Debug, Default)]
struct UplinkStats {
    rx_frames: AtomicU64,
    tx_frames: AtomicU64,
    dropped_full: AtomicU64,
    dropped_spoof: AtomicU64,
    dropped_bad_frame: AtomicU64,
    errors: AtomicU64,
}

/// Where a frame entered the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Port(usize),
    Uplink,
}

/// A port's receive path, published by its connection once the frontend has
/// set up its queues; cleared when the connection ends.
struct RxPath {
    vring: VringRwLock,
    mem: Mem,
    walker: ChainWalker,
    /// Used entries added since the last notification check.
    pending: bool,
}

/// One switch port.
pub struct Port {
    /// The spec it was built from.
    pub spec: PortSpec,
    /// Counters.
    pub stats: PortStats,
    rx: Mutex<Option<RxPath>>,
    connected: AtomicBool,
}

impl Port {
    fn rx(&self) -> MutexGuard<'_, Option<RxPath>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether frames for this port can be delivered now: a frontend is
    /// connected, and its receive queue is set up, enabled and known to the
    /// switch (which happens on the queue's first event, right after the
    /// frontend enables it). Frames that arrive before are `dropped_down`,
    /// as on a link that is not up yet.
    pub fn rx_ready(&self) -> bool {
        match self.rx().as_ref() {
            Some(rx) => {
                let state = rx.vring.get_ref();
                state.is_enabled() && state.get_queue().ready()
            }
            None => false,
        }
    }
}

/// The uplink: a TAP device and its counters.
struct Uplink {
    tap: Tap,
    stats: UplinkStats,
}

/// One L2 switch: its ports, the addresses learned on the uplink, the uplink.
pub struct Switch {
    ports: Vec<Port>,
    by_mac: HashMap<MacAddr, usize>,
    learned: Mutex<HashMap<MacAddr, Instant>>,
    uplink: Option<Uplink>,
}

/// Per-thread record of the ports that got frames and may need an interrupt.
pub struct Touched(Vec<bool>);

impl Switch {
    /// A switch with `ports` and an optional uplink. Ports must have distinct
    /// sockets and MACs.
    pub fn new(ports: Vec<PortSpec>, uplink: Option<Tap>) -> Result<Arc<Switch>, NetError> {
        let mut by_mac = HashMap::new();
        let mut sockets = std::collections::HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            if by_mac.insert(p.mac, i).is_some() {
                return Err(NetError::DuplicateMac(p.mac));
            }
            if !sockets.insert(p.socket.clone()) {
                return Err(NetError::DuplicateSocket(p.socket.clone()));
            }
        }
        Ok(Arc::new(Switch {
            ports: ports
                .into_iter()
                .map(|spec| Port {
                    spec,
                    stats: PortStats::default(),
                    rx: Mutex::new(None),
                    connected: AtomicBool::new(false),
                })
                .collect(),
            by_mac,
            learned: Mutex::new(HashMap::new()),
            uplink: uplink.map(|tap| Uplink {
                tap,
                stats: UplinkStats::default(),
            }),
        }))
    }

    /// The ports, in command-line order.
    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    /// A fresh [`Touched`] set for this switch.
    pub fn touched(&self) -> Touched {
        Touched(vec![false; self.ports.len()])
    }

    /// The uplink's interface name, if any.
    pub fn uplink_name(&self) -> Option<&str> {
        self.uplink.as_ref().map(|u| u.tap.name())
    }

    /// Forwards `frame` (Ethernet header first) that entered at `from`.
    fn forward(&self, from: Source, frame: &[u8], touched: &mut Touched) {
        let dst = MacAddr::from_slice(&frame[0..6]);
        if !dst.is_multicast() {
            if let Some(&j) = self.by_mac.get(&dst) {
                if from != Source::Port(j) {
                    self.deliver(j, frame, true, touched);
                }
                return;
            }
            if self.is_learned(dst) {
                if from != Source::Uplink {
                    self.send_uplink(frame);
                }
                return;
            }
        }
        for j in 0..self.ports.len() {
            if from != Source::Port(j) {
                self.deliver(j, frame, false, touched);
            }
        }
        if from != Source::Uplink {
            self.send_uplink(frame);
        }
    }

    fn is_learned(&self, mac: MacAddr) -> bool {
        if self.uplink.is_none() {
            return false;
        }
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        match learned.get(&mac) {
            Some(t) if t.elapsed() < LEARN_AGE => true,
            Some(_) => {
                learned.remove(&mac);
                false
            }
            None => false,
        }
    }

    fn learn(&self, mac: MacAddr) {
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if learned.len() >= MAX_LEARNED && !learned.contains_key(&mac) {
            learned.retain(|_, t| now.duration_since(*t) < LEARN_AGE);
            if learned.len() >= MAX_LEARNED {
                return;
            }
        }
        learned.insert(mac, now);
    }

    fn send_uplink(&self, frame: &[u8]) {
        let Some(up) = &self.uplink else { return };
        // SAFETY: write(2) from a live slice to the tap fd we own.
        let n = unsafe {
            libc::write(
                up.tap.file().as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
            )
        };
        if n >= 0 {
            bump(&up.stats.tx_frames);
            return;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                bump(&up.stats.dropped_full);
            }
            // The interface is down: the host is not listening.
            Some(libc::EIO) => {
                bump(&up.stats.dropped_full);
            }
            _ => {
                let n = bump(&up.stats.errors);
                if n <= 8 || n.is_power_of_two() {
                    warn!(tap = %up.tap.name(), "write to the tap failed: {e} ({n} so far)");
                }
            }
        }
    }

    /// Puts `frame` into port `j`'s receive ring, or counts why not.
    fn deliver(&self, j: usize, frame: &[u8], unicast: bool, touched: &mut Touched) {
        let port = &self.ports[j];
        let mut guard = port.rx();
        let Some(rx) = guard.as_mut() else {
            if unicast {
                bump(&port.stats.dropped_down);
            }
            return;
        };
        let mem = rx.mem.memory();
        let mut state = rx.vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            drop(state);
            if unicast {
                bump(&port.stats.dropped_down);
            }
            return;
        }
        let queue = state.get_queue_mut();
        if queue.iter(&*mem).is_err() {
            let n = port.stats.count_malformed(Malformed::BadAvailIndex);
            if n.is_power_of_two() {
                warn!(port = %port.spec.socket.display(), "receive queue unusable until reset ({n} frames dropped so far)");
            }
            bump(&port.stats.dropped_full);
            return;
        }
        let desc_table = GuestAddress(queue.desc_table());
        let queue_size = queue.size();
        let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
            bump(&port.stats.dropped_full);
            return;
        };
        let head = chain.head_index();
        let len = match rx.walker.walk_segments(&*mem, desc_table, queue_size, head) {
            Err(Malformed::BadHead) => {
                // No used entry can name a head outside the queue.
                port.stats.count_malformed(Malformed::BadHead);
                return;
            }
            Err(kind) => {
                let n = port.stats.count_malformed(kind);
                if n <= 8 || n.is_power_of_two() {
                    warn!(port = %port.spec.socket.display(), "malformed receive chain (head {head}): {}; returned with length 0 ({n} so far)", kind.name());
                }
                0
            }
            Ok(()) => {
                let segs = rx.walker.segments();
                let room: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
                if segs.iter().any(|s| !s.write) || room < (HDR_LEN + frame.len()) as u64 {
                    let n = bump(&port.stats.rx_bad_buffer);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(port = %port.spec.socket.display(), "receive buffer (head {head}, {room} bytes) is not device-writable or smaller than {} bytes; returned with length 0 ({n} so far)", HDR_LEN + MAX_FRAME);
                    }
                    0
                } else {
                    let mut hdr = [0u8; HDR_LEN];
                    hdr[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
                    if scatter(&mem, segs, &[&hdr, frame]).is_err() {
                        port.stats.count_malformed(Malformed::BadAddress);
                        0
                    } else {
                        bump(&port.stats.rx_frames);
                        port.stats
                            .rx_bytes
                            .fetch_add(frame.len() as u64, Ordering::Relaxed);
                        (HDR_LEN + frame.len()) as u32
                    }
                }
            }
        };
        match queue.add_used(&*mem, head, len) {
            Ok(()) => {
                rx.pending = true;
                touched.0[j] = true;
            }
            Err(e) => warn!(port = %port.spec.socket.display(), "cannot add used entry: {e}"),
        }
    }

    /// Raises the receive interrupt of every touched port that needs one.
    fn notify(&self, touched: &mut Touched) {
        for (j, t) in touched.0.iter_mut().enumerate() {
            if !std::mem::take(t) {
                continue;
            }
            let port = &self.ports[j];
            let mut guard = port.rx();
            let Some(rx) = guard.as_mut() else { continue };
            if !std::mem::take(&mut rx.pending) {
                continue;
            }
            let mem = rx.mem.memory();
            let mut state = rx.vring.get_mut();
            match state.get_queue_mut().needs_notification(&*mem) {
                Ok(true) => {
                    if let Err(e) = state.signal_used_queue() {
                        warn!(port = %port.spec.socket.display(), "cannot signal the receive queue: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => warn!(port = %port.spec.socket.display(), "cannot read used_event: {e}"),
            }
        }
    }

    /// Counters of every port and the uplink, as one JSON line (the answer
    /// of the stats socket).
    pub fn stats_json(&self) -> String {
        #[derive(Serialize)]
        struct PortJson<'a> {
            socket: &'a Path,
            mac: MacAddr,
            connected: bool,
            rx_ready: bool,
            #[serde(flatten)]
            counters: PortCounters,
        }
        #[derive(Serialize)]
        struct UplinkJson<'a> {
            ifname: &'a str,
            #[serde(flatten)]
            counters: UplinkCounters,
        }
        #[derive(Serialize)]
        struct SwitchJson<'a> {
            ports: Vec<PortJson<'a>>,
            uplink: Option<UplinkJson<'a>>,
            learned: usize,
        }
        let doc = SwitchJson {
            ports: self
                .ports
                .iter()
                .map(|p| PortJson {
                    socket: &p.spec.socket,
                    mac: p.spec.mac,
                    connected: p.connected.load(Ordering::Relaxed),
                    rx_ready: p.rx_ready(),
                    counters: p.stats.snapshot(),
                })
                .collect(),
            uplink: self.uplink.as_ref().map(|u| UplinkJson {
                ifname: u.tap.name(),
                counters: UplinkCounters {
                    rx_frames: get(&u.stats.rx_frames),
                    tx_frames: get(&u.stats.tx_frames),
                    dropped_full: get(&u.stats.dropped_full),
                    dropped_spoof: get(&u.stats.dropped_spoof),
                    dropped_bad_frame: get(&u.stats.dropped_bad_frame),
                    errors: get(&u.stats.errors),
                },
            }),
            learned: self.learned.lock().unwrap_or_else(|p| p.into_inner()).len(),
        };
        // Serializing plain structs of numbers and strings cannot fail.
        serde_json::to_string(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Reads frames from the uplink and forwards them, forever. Runs on its
    /// own thread; returns only if the tap fails.
    pub fn run_uplink(&self) -> io::Result<()> {
        let Some(up) = &self.uplink else {
            return Ok(());
        };
        let fd = up.tap.file().as_raw_fd();
        let mut buf = vec![0u8; 65536];
        let mut touched = self.touched();
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for _ in 0..TX_BATCH {
                // SAFETY: read(2) into a live buffer of buf.len() bytes.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            // A tap whose interface went away reads EBADFD/EIO.
                            self.notify(&mut touched);
                            return Err(e);
                        }
                    }
                }
                let frame = &buf[..n as usize];
                if frame.len() < MIN_FRAME || frame.len() > MAX_FRAME {
                    bump(&up.stats.dropped_bad_frame);
                    continue;
                }
                let src = MacAddr::from_slice(&frame[6..12]);
                if src.is_multicast() || self.by_mac.contains_key(&src) {
                    bump(&up.stats.dropped_spoof);
                    continue;
                }
                bump(&up.stats.rx_frames);
                self.learn(src);
                self.forward(Source::Uplink, frame, &mut touched);
            }
            self.notify(&mut touched);
        }
    }
}

/// Copies `parts` one after the other into the start of `segs`.
fn scatter(mem: &GuestMemoryMmap<()>, segs: &[Segment], parts: &[&[u8]]) -> Result<(), ()> {
    let mut seg = 0;
    let mut seg_off = 0usize;
    for part in parts {
        let mut done = 0;
        while done < part.len() {
            let s = segs.get(seg).ok_or(())?;
            let room = s.len as usize - seg_off;
            if room == 0 {
                seg += 1;
                seg_off = 0;
                continue;
            }
            let n = room.min(part.len() - done);
            let addr = s.addr.checked_add(seg_off as u64).ok_or(())?;
            mem.write_slice(&part[done..done + n], addr)
                .map_err(|_| ())?;
            done += n;
            seg_off += n;
        }
    }
    Ok(())
}

/// Copies `out.len()` bytes of `segs`, starting `skip` bytes in, into `out`.
fn gather(
    mem: &GuestMemoryMmap<()>,
    segs: &[Segment],
    mut skip: usize,
    out: &mut [u8],
) -> Result<(), ()> {
    let mut done = 0;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - done);
        let addr = s.addr.checked_add(skip as u64).ok_or(())?;
        mem.read_slice(&mut out[done..done + n], addr)
            .map_err(|_| ())?;
        skip = 0;
        done += n;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// One port of a switch, as served by the listener.
pub struct PortEndpoint {
    switch: Arc<Switch>,
    index: usize,
}

impl PortEndpoint {
    /// Port `index` of `switch`.
    pub fn new(switch: Arc<Switch>, index: usize) -> PortEndpoint {
        PortEndpoint { switch, index }
    }

    /// The port.
    pub fn port(&self) -> &Port {
        &self.switch.ports[self.index]
    }
}

impl Endpoint for PortEndpoint {
    type Backend = NetBackend;

    fn socket(&self) -> &Path {
        &self.port().spec.socket
    }

    fn kind(&self) -> &'static str {
        "net"
    }

    fn new_backend(self: &Arc<Self>, mem: &Mem) -> NetBackend {
        NetBackend::new(self.switch.clone(), self.index, mem.clone())
    }

    fn count_connection(&self) -> u64 {
        self.port().connected.store(true, Ordering::Relaxed);
        bump(&self.port().stats.connections)
    }

    fn count_refused_region(&self) {
        bump(&self.port().stats.refused_regions);
    }

    fn summary(&self) -> String {
        let p = self.port();
        let c = p.stats.snapshot();
        let mut s = format!(
            "mac={} tx_frames={} tx_bytes={} rx_frames={} rx_bytes={} dropped_full={} dropped_down={} dropped_spoof={} tx_bad_frame={} rx_bad_buffer={} refused_regions={} connections={}",
            p.spec.mac, c.tx_frames, c.tx_bytes, c.rx_frames, c.rx_bytes, c.dropped_full,
            c.dropped_down, c.dropped_spoof, c.tx_bad_frame, c.rx_bad_buffer, c.refused_regions,
            c.connections
        );
        for (k, v) in c.malformed {
            s.push_str(&format!(" malformed.{k}={v}"));
        }
        s
    }

    fn disconnected(&self) {
        let p = self.port();
        *p.rx() = None;
        p.connected.store(false, Ordering::Relaxed);
    }

    fn exit_fds(backend: &mut NetBackend) -> &mut ExitFds {
        &mut backend.exit_fds
    }
}

/// virtio-net over vhost-user for one connection of one port.
pub struct NetBackend {
    switch: Arc<Switch>,
    index: usize,
    mem: Mem,
    config: [u8; CONFIG_LEN],
    walker: ChainWalker,
    batch: Vec<u8>,
    lens: Vec<usize>,
    touched: Touched,
    event_idx: bool,
    rx_published: bool,
    exit_fds: ExitFds,
}

impl NetBackend {
    fn new(switch: Arc<Switch>, index: usize, mem: Mem) -> NetBackend {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&switch.ports[index].spec.mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&1500u16.to_le_bytes());
        let touched = switch.touched();
        NetBackend {
            switch,
            index,
            mem,
            config,
            walker: ChainWalker::new(MAX_QUEUE_SIZE),
            batch: vec![0u8; TX_BATCH * MAX_FRAME],
            lens: Vec::with_capacity(TX_BATCH),
            touched,
            event_idx: false,
            rx_published: false,
            exit_fds: ExitFds::default(),
        }
    }

    fn port(&self) -> &Port {
        &self.switch.ports[self.index]
    }

    /// Makes this connection's receive queue reachable by the other ports.
    fn publish_rx(&mut self, vrings: &[VringRwLock]) {
        if self.rx_published {
            return;
        }
        let Some(vring) = vrings.get(RX_QUEUE) else {
            return;
        };
        *self.port().rx() = Some(RxPath {
            vring: vring.clone(),
            mem: self.mem.clone(),
            walker: ChainWalker::new(MAX_QUEUE_SIZE),
            pending: false,
        });
        self.rx_published = true;
    }

    /// Copies up to [`TX_BATCH`] frames out of the transmit ring into the
    /// batch buffer, completing their chains; returns how many chains it took.
    fn take_tx_batch(&mut self, vring: &VringRwLock) -> io::Result<usize> {
        self.lens.clear();
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let stats = &self.switch.ports[self.index].stats;
        let name = self.switch.ports[self.index].spec.socket.display();
        if let Err(e) = queue.iter(&*mem) {
            let n = stats.count_malformed(Malformed::BadAvailIndex);
            if n.is_power_of_two() {
                warn!(port = %name, "transmit queue unusable until reset: {e} ({n} kicks so far)");
            }
            return Ok(0);
        }
        let desc_table = GuestAddress(queue.desc_table());
        let queue_size = queue.size();
        let mut taken = 0;
        let mut added = false;
        while taken < TX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            match self
                .walker
                .walk_segments(&*mem, desc_table, queue_size, head)
            {
                Err(Malformed::BadHead) => {
                    stats.count_malformed(Malformed::BadHead);
                    continue;
                }
                Err(kind) => {
                    let n = stats.count_malformed(kind);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(port = %name, "malformed transmit chain (head {head}): {}; returned with length 0 ({n} so far)", kind.name());
                    }
                }
                Ok(()) => {
                    let segs = self.walker.segments();
                    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
                    let frame_len = total.saturating_sub(HDR_LEN as u64) as usize;
                    let slot = self.lens.len() * MAX_FRAME;
                    let mut hdr = [0u8; HDR_LEN];
                    let ok = !segs.iter().any(|s| s.write)
                        && (MIN_FRAME..=MAX_FRAME).contains(&frame_len)
                        && total >= HDR_LEN as u64
                        && gather(&mem, segs, 0, &mut hdr).is_ok()
                        && hdr[..NUM_BUFFERS_OFFSET] == [0; NUM_BUFFERS_OFFSET]
                        && gather(&mem, segs, HDR_LEN, &mut self.batch[slot..slot + frame_len])
                            .is_ok();
                    if ok {
                        self.lens.push(frame_len);
                    } else {
                        let n = bump(&stats.tx_bad_frame);
                        if n <= 8 || n.is_power_of_two() {
                            warn!(port = %name, "bad transmit buffer (head {head}, {total} bytes): needs a zero 12-byte virtio_net_hdr_v1 and a {MIN_FRAME}..={MAX_FRAME}-byte frame in device-readable descriptors; dropped ({n} so far)");
                        }
                    }
                }
            }
            match queue.add_used(&*mem, head, 0) {
                Ok(()) => added = true,
                Err(e) => warn!(port = %name, "cannot add used entry: {e}"),
            }
        }
        if added {
            match queue.needs_notification(&*mem) {
                Ok(true) => state.signal_used_queue()?,
                Ok(false) => {}
                Err(e) => warn!(port = %name, "cannot read used_event: {e}"),
            }
        }
        Ok(taken)
    }

    /// Drains the transmit ring, forwarding every frame.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        loop {
            let taken = self.take_tx_batch(vring)?;
            let port = &self.switch.ports[self.index];
            for (i, &len) in self.lens.iter().enumerate() {
                let frame = &self.batch[i * MAX_FRAME..i * MAX_FRAME + len];
                if frame[6..12] != port.spec.mac.0 {
                    let n = bump(&port.stats.dropped_spoof);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(port = %port.spec.socket.display(), "frame from source {} dropped: the port's MAC is {} ({n} so far)", MacAddr::from_slice(&frame[6..12]), port.spec.mac);
                    }
                    continue;
                }
                bump(&port.stats.tx_frames);
                port.stats.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                self.switch
                    .forward(Source::Port(self.index), frame, &mut self.touched);
            }
            self.switch.notify(&mut self.touched);
            if taken < TX_BATCH {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        (offset..offset.saturating_add(size))
            .map(|i| self.config.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match self.exit_fds.create() {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!(port = %self.port().spec.socket.display(), "cannot create the worker exit eventfd: {e}");
                None
            }
        }
    }

    fn update_memory(&mut self, _mem: Mem) -> io::Result<()> {
        // `self.mem` is the same GuestMemoryAtomic the daemon just updated.
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected epoll events {evset:?}"
            )));
        }
        self.publish_rx(vrings);
        match usize::from(device_event) {
            // New receive buffers: frames are never queued in part-io, so
            // there is nothing to do beyond having published the ring.
            RX_QUEUE => Ok(()),
            TX_QUEUE => {
                let Some(vring) = vrings.get(TX_QUEUE) else {
                    return Ok(());
                };
                if !self.event_idx {
                    return self.process_tx(vring);
                }
                loop {
                    if let Err(e) = vring.disable_notification() {
                        warn!(port = %self.port().spec.socket.display(), "cannot disable notifications: {e}");
                    }
                    self.process_tx(vring)?;
                    match vring.enable_notification() {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            warn!(port = %self.port().spec.socket.display(), "cannot enable notifications: {e}");
                            break;
                        }
                    }
                }
                Ok(())
            }
            other => {
                error!(port = %self.port().spec.socket.display(), "event for unknown queue {other}");
                Ok(())
            }
        }
    }
}

/// Serves `switch.stats_json()` on `listener`: one JSON line per connection,
/// forever.
pub fn serve_stats(switch: &Switch, listener: std::os::unix::net::UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(mut s) => {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let mut line = switch.stats_json();
                line.push('\n');
                let _ = s.write_all(line.as_bytes());
            }
            Err(e) => {
                warn!("stats socket accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_and_bad_ones_name_the_problem() {
        let p: PortSpec = "socket=/run/a.sock,mac=02:00:00:00:00:0a".parse().unwrap();
        assert_eq!(p.socket, PathBuf::from("/run/a.sock"));
        assert_eq!(p.mac, MacAddr([2, 0, 0, 0, 0, 0x0a]));
        assert_eq!(p.mac.to_string(), "02:00:00:00:00:0a");
        let e = |s: &str| s.parse::<PortSpec>().unwrap_err().to_string();
        assert!(e("mac=02:00:00:00:00:01").contains("missing `socket=PATH`"));
        assert!(e("socket=a").contains("missing `mac="));
        assert!(e("socket=a,mac=02:00:00:00:00").contains("not a MAC address"));
        assert!(e("socket=a,mac=02:00:00:00:00:01:03").contains("not a MAC address"));
        assert!(e("socket=a,mac=0g:00:00:00:00:01").contains("not a MAC address"));
        assert!(e("socket=a,mac=ff:ff:ff:ff:ff:ff").contains("needs a unicast MAC"));
        assert!(e("socket=a,mac=01:00:5e:00:00:01").contains("needs a unicast MAC"));
        assert!(e("socket=a,mac=00:00:00:00:00:00").contains("needs a unicast MAC"));
        assert!(e("socket=a,mac=02:00:00:00:00:01,vlan=3").contains("unknown key `vlan`"));
        assert!(e("socket=a,socket=b,mac=02:00:00:00:00:01").contains("`socket` given twice"));
    }

    #[test]
    fn a_switch_refuses_duplicate_macs_and_sockets() {
        let p = |s: &str, m: &str| PortSpec {
            socket: s.into(),
            mac: m.parse().unwrap(),
        };
        let e = Switch::new(
            vec![p("a", "02:00:00:00:00:01"), p("b", "02:00:00:00:00:01")],
            None,
        )
        .err()
        .unwrap();
        assert!(matches!(e, NetError::DuplicateMac(_)), "{e}");
        let e = Switch::new(
            vec![p("a", "02:00:00:00:00:01"), p("a", "02:00:00:00:00:02")],
            None,
        )
        .err()
        .unwrap();
        assert!(matches!(e, NetError::DuplicateSocket(_)), "{e}");
    }

    #[test]
    fn scatter_and_gather_cross_segment_boundaries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 5,
                write: true,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 0,
                write: true,
            },
            Segment {
                addr: GuestAddress(0x3000),
                len: 20,
                write: true,
            },
        ];
        let data: Vec<u8> = (1..=16).collect();
        scatter(&mem, &segs, &[&[0xaa; 3], &data]).unwrap();
        let mut out = vec![0u8; 16];
        gather(&mem, &segs, 3, &mut out).unwrap();
        assert_eq!(out, data);
        let mut b = [0u8; 5];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0xaa, 0xaa, 0xaa, 1, 2]);
        // Not enough room.
        assert!(scatter(&mem, &segs, &[&[0u8; 26]]).is_err());
        let mut big = vec![0u8; 26];
        assert!(gather(&mem, &segs, 0, &mut big).is_err());
    }
}
