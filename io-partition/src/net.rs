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
//! # Copies and locking
//!
//! The sender's worker takes a batch of chains off its transmit ring (holding
//! that vring's lock only for this), validates them and copies out each
//! frame's 14-byte Ethernet header, which is what the switch checks and what
//! receivers get. It then forwards each frame: for every receiver it takes
//! that port's `rx` lock (then its vring lock), and copies the frame body
//! once, from the sender's guest memory straight into the receiver's receive
//! buffer. Only after the whole batch is forwarded does it take its own
//! transmit lock again to return the chains to the guest. A thread holds at
//! most one port's `rx` lock and never a transmit lock at the same time, so
//! there is no lock order to break. The uplink writes a frame to the tap
//! with one `writev` from the same places.

use partvisor_runtime::sync::MutexExt;
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
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::{gather, ChainWalker, Malformed, Segment};
use crate::server::{check_kick_events, config_bytes, drain_queue, Endpoint, ExitFds, Mem};
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
/// Length of an Ethernet header (destination, source, type).
pub const ETH_HDR: usize = 14;
/// Shortest frame accepted: an Ethernet header.
pub const MIN_FRAME: usize = ETH_HDR;
/// Longest frame accepted: 1500-byte payload plus the Ethernet header, no FCS.
pub const MAX_FRAME: usize = 1514;
/// How long an address learned on the uplink stays known without traffic.
pub const LEARN_AGE: Duration = Duration::from_secs(300);
/// Most addresses learned on the uplink; beyond that unknown ones flood.
pub const MAX_LEARNED: usize = 4096;
/// Chains taken off a transmit ring before they are forwarded.
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

/// A frame being forwarded.
///
/// Its Ethernet header was copied out of the sender once and checked (the
/// source MAC); that copy is what every receiver gets, so a guest rewriting
/// its transmit buffer while the frame is in flight can change only its own
/// payload, never the addresses the switch decided on. The body is copied
/// once per receiver, straight from the sender's memory into the receiver's.
struct Frame<'a> {
    eth: [u8; ETH_HDR],
    body: Body<'a>,
}

enum Body<'a> {
    /// Already in part-io's memory (read from the uplink).
    Bytes(&'a [u8]),
    /// Still in the sender's guest memory, in these (checked) segments.
    Guest {
        mem: &'a GuestMemoryMmap<()>,
        segs: &'a [Segment],
        len: usize,
    },
}

impl Frame<'_> {
    /// Length of the Ethernet frame.
    fn len(&self) -> usize {
        ETH_HDR
            + match &self.body {
                Body::Bytes(b) => b.len(),
                Body::Guest { len, .. } => *len,
            }
    }

    fn dst(&self) -> MacAddr {
        MacAddr::from_slice(&self.eth[0..6])
    }
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
        self.rx.locked()
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
struct Touched(Vec<bool>);

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
    fn touched(&self) -> Touched {
        Touched(vec![false; self.ports.len()])
    }

    /// The uplink's interface name, if any.
    pub fn uplink_name(&self) -> Option<&str> {
        self.uplink.as_ref().map(|u| u.tap.name())
    }

    /// Whether part-io created the uplink tap (rather than attaching to one).
    pub fn uplink_created(&self) -> bool {
        self.uplink.as_ref().is_some_and(|u| u.tap.created())
    }

    /// Forwards `frame`, which entered at `from`.
    fn forward(&self, from: Source, frame: &Frame<'_>, touched: &mut Touched) {
        let dst = frame.dst();
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
        let mut learned = self.learned.locked();
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
        let mut learned = self.learned.locked();
        let now = Instant::now();
        if learned.len() >= MAX_LEARNED && !learned.contains_key(&mac) {
            learned.retain(|_, t| now.duration_since(*t) < LEARN_AGE);
            if learned.len() >= MAX_LEARNED {
                return;
            }
        }
        learned.insert(mac, now);
    }

    fn send_uplink(&self, frame: &Frame<'_>) {
        let Some(up) = &self.uplink else { return };
        let mut iovecs = Vec::with_capacity(4);
        iovecs.push(libc::iovec {
            iov_base: frame.eth.as_ptr() as *mut libc::c_void,
            iov_len: ETH_HDR,
        });
        match &frame.body {
            Body::Bytes(b) => iovecs.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            }),
            Body::Guest { mem, segs, .. } => {
                for s in segs.iter().filter(|s| s.len > 0) {
                    for slice in mem.get_slices(s.addr, s.len as usize) {
                        let Ok(slice) = slice else {
                            // Checked by the walker; the memory table cannot
                            // change under the snapshot we hold.
                            bump(&up.stats.errors);
                            return;
                        };
                        iovecs.push(libc::iovec {
                            iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                            iov_len: slice.len(),
                        });
                    }
                }
            }
        }
        let iovcnt = libc::c_int::try_from(iovecs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the iovecs point into `frame.eth` and into guest memory
        // whose mapping the caller's snapshot keeps alive for this call; the
        // kernel only reads them.
        let n = unsafe { libc::writev(up.tap.file().as_raw_fd(), iovecs.as_ptr(), iovcnt) };
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
    fn deliver(&self, j: usize, frame: &Frame<'_>, unicast: bool, touched: &mut Touched) {
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
                    let mut out = Cursor::new(&mem, segs);
                    let copied = out
                        .put(&hdr)
                        .and_then(|()| out.put(&frame.eth))
                        .and_then(|()| match &frame.body {
                            Body::Bytes(b) => out.put(b),
                            Body::Guest { mem, segs, .. } => out.put_guest(mem, segs),
                        });
                    if copied.is_err() {
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
            learned: self.learned.locked().len(),
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
                let mut eth = [0u8; ETH_HDR];
                eth.copy_from_slice(&frame[..ETH_HDR]);
                let frame = Frame {
                    eth,
                    body: Body::Bytes(&frame[ETH_HDR..]),
                };
                self.forward(Source::Uplink, &frame, &mut touched);
            }
            self.notify(&mut touched);
        }
    }
}

/// Writes sequentially into the device-writable segments of a chain.
struct Cursor<'a> {
    mem: &'a GuestMemoryMmap<()>,
    segs: &'a [Segment],
    seg: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    fn new(mem: &'a GuestMemoryMmap<()>, segs: &'a [Segment]) -> Self {
        Cursor {
            mem,
            segs,
            seg: 0,
            off: 0,
        }
    }

    /// The next writable range, skipping exhausted and empty segments.
    fn room(&mut self) -> Result<(GuestAddress, usize), ()> {
        loop {
            let s = self.segs.get(self.seg).ok_or(())?;
            let left = s.len as usize - self.off;
            if left > 0 {
                return Ok((s.addr.checked_add(self.off as u64).ok_or(())?, left));
            }
            self.seg += 1;
            self.off = 0;
        }
    }

    /// Appends `bytes`.
    fn put(&mut self, mut bytes: &[u8]) -> Result<(), ()> {
        while !bytes.is_empty() {
            let (addr, room) = self.room()?;
            let n = room.min(bytes.len());
            self.mem.write_slice(&bytes[..n], addr).map_err(|_| ())?;
            bytes = &bytes[n..];
            self.off += n;
        }
        Ok(())
    }

    /// Appends the bytes of `src_segs` in `src_mem` (another guest's
    /// memory), copying them once, memory to memory.
    fn put_guest(&mut self, src_mem: &GuestMemoryMmap<()>, src_segs: &[Segment]) -> Result<(), ()> {
        for s in src_segs.iter().filter(|s| s.len > 0) {
            for slice in src_mem.get_slices(s.addr, s.len as usize) {
                let mut slice = slice.map_err(|_| ())?;
                while !slice.is_empty() {
                    let (addr, room) = self.room()?;
                    let n = room.min(slice.len());
                    let (mut head, rest) = slice.split_at(n).map_err(|_| ())?;
                    for dst in self.mem.get_slices(addr, n) {
                        let dst = dst.map_err(|_| ())?;
                        let (chunk, more) = head.split_at(dst.len()).map_err(|_| ())?;
                        chunk.copy_to_volatile_slice(dst);
                        head = more;
                    }
                    self.off += n;
                    slice = rest;
                }
            }
        }
        Ok(())
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

/// One chain taken off a transmit ring.
struct TxEntry {
    head: u16,
    /// False for a head outside the queue: no used entry can name it.
    complete: bool,
    /// The frame, if the chain held a valid one.
    frame: Option<TxFrame>,
}

struct TxFrame {
    eth: [u8; ETH_HDR],
    segs: std::ops::Range<usize>,
    body_len: usize,
}

/// virtio-net over vhost-user for one connection of one port.
pub struct NetBackend {
    switch: Arc<Switch>,
    index: usize,
    mem: Mem,
    config: [u8; CONFIG_LEN],
    walker: ChainWalker,
    /// Chains taken off the transmit ring, not yet completed.
    tx: Vec<TxEntry>,
    /// Frame bodies (after the Ethernet header) of `tx`, as guest segments.
    tx_segs: Vec<Segment>,
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
            tx: Vec::with_capacity(TX_BATCH),
            tx_segs: Vec::with_capacity(TX_BATCH * 4),
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

    /// Takes up to [`TX_BATCH`] chains off the transmit ring (holding its
    /// lock only for that), validating each and copying out its headers;
    /// returns how many it took. The chains stay owned by the device until
    /// [`NetBackend::complete_tx`].
    fn take_tx_batch(&mut self, mem: &GuestMemoryMmap<()>, vring: &VringRwLock) -> usize {
        self.tx.clear();
        self.tx_segs.clear();
        let port = &self.switch.ports[self.index];
        let (stats, name) = (&port.stats, port.spec.socket.display());
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        if let Err(e) = queue.iter(mem) {
            let n = stats.count_malformed(Malformed::BadAvailIndex);
            if n.is_power_of_two() {
                warn!(port = %name, "transmit queue unusable until reset: {e} ({n} kicks so far)");
            }
            return 0;
        }
        let desc_table = GuestAddress(queue.desc_table());
        let queue_size = queue.size();
        while self.tx.len() < TX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut entry = TxEntry {
                head,
                complete: true,
                frame: None,
            };
            match self.walker.walk_segments(mem, desc_table, queue_size, head) {
                Err(kind) => {
                    entry.complete = kind != Malformed::BadHead;
                    let n = stats.count_malformed(kind);
                    if entry.complete && (n <= 8 || n.is_power_of_two()) {
                        warn!(port = %name, "malformed transmit chain (head {head}): {}; returned with length 0 ({n} so far)", kind.name());
                    }
                }
                Ok(()) => {
                    let segs = self.walker.segments();
                    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
                    let frame_len = total.saturating_sub(HDR_LEN as u64) as usize;
                    let mut hdr = [0u8; HDR_LEN];
                    let mut eth = [0u8; ETH_HDR];
                    let ok = !segs.iter().any(|s| s.write)
                        && total >= HDR_LEN as u64
                        && (MIN_FRAME..=MAX_FRAME).contains(&frame_len)
                        && gather(mem, segs, 0, &mut hdr).is_ok()
                        && hdr[..NUM_BUFFERS_OFFSET] == [0; NUM_BUFFERS_OFFSET]
                        && gather(mem, segs, HDR_LEN, &mut eth).is_ok();
                    if ok {
                        let start = self.tx_segs.len();
                        push_tail(segs, HDR_LEN + ETH_HDR, &mut self.tx_segs);
                        entry.frame = Some(TxFrame {
                            eth,
                            segs: start..self.tx_segs.len(),
                            body_len: frame_len - ETH_HDR,
                        });
                    } else {
                        let n = bump(&stats.tx_bad_frame);
                        if n <= 8 || n.is_power_of_two() {
                            warn!(port = %name, "bad transmit buffer (head {head}, {total} bytes): needs a zero 12-byte virtio_net_hdr_v1 and a {MIN_FRAME}..={MAX_FRAME}-byte frame in device-readable descriptors; dropped ({n} so far)");
                        }
                    }
                }
            }
            self.tx.push(entry);
        }
        self.tx.len()
    }

    /// Returns the batch's chains to the guest (used length 0) and signals it.
    fn complete_tx(&mut self, mem: &GuestMemoryMmap<()>, vring: &VringRwLock) -> io::Result<()> {
        let name = self.switch.ports[self.index].spec.socket.display();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let mut added = false;
        for e in self.tx.iter().filter(|e| e.complete) {
            match queue.add_used(mem, e.head, 0) {
                Ok(()) => added = true,
                Err(e) => warn!(port = %name, "cannot add used entry: {e}"),
            }
        }
        if added {
            match queue.needs_notification(mem) {
                Ok(true) => state.signal_used_queue()?,
                Ok(false) => {}
                Err(e) => warn!(port = %name, "cannot read used_event: {e}"),
            }
        }
        Ok(())
    }

    /// Drains the transmit ring, forwarding every frame. Frames are copied
    /// from the sender's buffers straight into the receivers' before the
    /// sender gets its buffers back; no lock is held across ports.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        loop {
            // One snapshot of this guest's memory for the whole batch: its
            // mapping stays alive while other ports copy out of it.
            let mem = self.mem.memory();
            let taken = self.take_tx_batch(&mem, vring);
            let port = &self.switch.ports[self.index];
            for f in self.tx.iter().filter_map(|e| e.frame.as_ref()) {
                if f.eth[6..12] != port.spec.mac.0 {
                    let n = bump(&port.stats.dropped_spoof);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(port = %port.spec.socket.display(), "frame from source {} dropped: the port's MAC is {} ({n} so far)", MacAddr::from_slice(&f.eth[6..12]), port.spec.mac);
                    }
                    continue;
                }
                let frame = Frame {
                    eth: f.eth,
                    body: Body::Guest {
                        mem: &mem,
                        segs: &self.tx_segs[f.segs.clone()],
                        len: f.body_len,
                    },
                };
                bump(&port.stats.tx_frames);
                port.stats
                    .tx_bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                self.switch
                    .forward(Source::Port(self.index), &frame, &mut self.touched);
            }
            self.switch.notify(&mut self.touched);
            self.complete_tx(&mem, vring)?;
            if taken < TX_BATCH {
                return Ok(());
            }
        }
    }
}

/// Appends the segments of `segs` that lie after its first `skip` bytes.
fn push_tail(segs: &[Segment], mut skip: usize, out: &mut Vec<Segment>) {
    for s in segs {
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(Segment {
            // In guest memory for `len` bytes (checked by the walker).
            addr: GuestAddress(s.addr.0 + skip as u64),
            len: (len - skip) as u32,
            write: s.write,
        });
        skip = 0;
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

    fn acked_features(&mut self, features: u64) {
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn!(
                port = %self.port().spec.socket.display(),
                "frontend did not accept VIRTIO_F_VERSION_1 (features {features:#x}); \
                 part-io net always uses the 12-byte virtio_net_hdr_v1, so a legacy \
                 driver will see garbled frames"
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_bytes(&self.config, offset, size)
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
        check_kick_events(evset)?;
        self.publish_rx(vrings);
        match usize::from(device_event) {
            // New receive buffers: frames are never queued in part-io, so
            // there is nothing to do beyond having published the ring.
            RX_QUEUE => Ok(()),
            TX_QUEUE => {
                let Some(vring) = vrings.get(TX_QUEUE) else {
                    return Ok(());
                };
                drain_queue(
                    self,
                    vring,
                    self.event_idx,
                    NetBackend::process_tx,
                    |b, what, e| warn!(port = %b.port().spec.socket.display(), "{what}: {e}"),
                )
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
    fn cursor_and_gather_cross_segment_boundaries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let w = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
            write: true,
        };
        let segs = [w(0x1000, 5), w(0x2000, 0), w(0x3000, 20)];
        let data: Vec<u8> = (1..=16).collect();
        let mut c = Cursor::new(&mem, &segs);
        c.put(&[0xaa; 3]).unwrap();
        c.put(&data).unwrap();
        let mut out = vec![0u8; 16];
        gather(&mem, &segs, 3, &mut out).unwrap();
        assert_eq!(out, data);
        let mut b = [0u8; 5];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0xaa, 0xaa, 0xaa, 1, 2]);
        // Not enough room left (25 bytes in all, 19 used).
        assert!(c.put(&[0u8; 7]).is_err());
        let mut big = vec![0u8; 26];
        assert!(gather(&mem, &segs, 0, &mut big).is_err());
    }

    #[test]
    fn guest_to_guest_copy_follows_both_segment_lists() {
        // Two "guests", the source spanning two memory regions.
        let src = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        src.write_slice(&data[..200], GuestAddress(0xf80)).unwrap();
        src.write_slice(&data[200..], GuestAddress(0x1800)).unwrap();
        let r = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
            write: false,
        };
        // 0xf80..0x1048 crosses the region boundary at 0x1000.
        let src_segs = [r(0xf80, 200), r(0x1800, 0), r(0x1800, 100)];
        let dst_segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 13,
                write: true,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 400,
                write: true,
            },
        ];
        let mut c = Cursor::new(&dst, &dst_segs);
        c.put(&[9u8; 3]).unwrap();
        c.put_guest(&src, &src_segs).unwrap();
        let mut out = vec![0u8; 303];
        gather(&dst, &dst_segs, 0, &mut out).unwrap();
        assert_eq!(out[..3], [9, 9, 9]);
        assert_eq!(out[3..], data[..]);
        // More than the destination holds.
        let mut c = Cursor::new(&dst, &dst_segs[..1]);
        assert!(c.put_guest(&src, &src_segs).is_err());
    }

    #[test]
    fn push_tail_skips_the_headers_across_segments() {
        let r = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
            write: false,
        };
        let mut out = Vec::new();
        push_tail(&[r(0x100, 12), r(0x200, 10), r(0x300, 50)], 26, &mut out);
        assert_eq!(out, vec![r(0x304, 46)]);
        out.clear();
        push_tail(&[r(0x100, 40)], 26, &mut out);
        assert_eq!(out, vec![r(0x11a, 14)]);
    }
}
