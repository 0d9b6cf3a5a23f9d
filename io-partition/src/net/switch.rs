//! The L2 switch: its ports and how a frame is forwarded.
//!
//! A port's MAC is a static entry of the forwarding table and the only
//! source the port may send from (checked by its backend); addresses behind
//! the uplink are learned. Group and unknown destinations flood; a known one
//! goes to its one port or to the uplink. Delivery into a receive ring never
//! waits: no buffer posted, and the frame is dropped and counted.

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use partvisor_runtime::sync::MutexExt;
use tracing::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::frame::{Body, Frame, Source};
use super::stats::{bump, PortStats, UplinkStats};
use super::uplink::Uplink;
use super::{
    MacAddr, NetError, PortSpec, HDR_LEN, LEARN_AGE, MAX_FRAME, MAX_LEARNED, NUM_BUFFERS_OFFSET,
};
use crate::chain::{ChainWalker, Malformed};
use crate::copy::Cursor;
use crate::server::Mem;
use crate::tap::Tap;

/// A port's receive path, published by its connection once the frontend has
/// set up its queues; cleared when the connection ends.
pub(super) struct RxPath {
    pub(super) vring: VringRwLock,
    pub(super) mem: Mem,
    pub(super) walker: ChainWalker,
    /// Used entries added since the last notification check.
    pub(super) pending: bool,
}

/// One switch port.
pub struct Port {
    /// The spec it was built from.
    pub spec: PortSpec,
    /// Counters.
    pub stats: PortStats,
    rx: Mutex<Option<RxPath>>,
    pub(super) connected: AtomicBool,
}

impl Port {
    /// The receive path, locked.
    pub(super) fn rx(&self) -> MutexGuard<'_, Option<RxPath>> {
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

/// One L2 switch: its ports, the addresses learned on the uplink, the uplink.
pub struct Switch {
    pub(super) ports: Vec<Port>,
    pub(super) by_mac: HashMap<MacAddr, usize>,
    pub(super) learned: Mutex<HashMap<MacAddr, Instant>>,
    pub(super) uplink: Option<Uplink>,
}

/// Per-thread record of the ports that got frames and may need an interrupt.
pub(super) struct Touched(Vec<bool>);

impl Switch {
    /// A switch with `ports` and an optional uplink. Ports must have distinct
    /// sockets and MACs.
    pub fn new(ports: Vec<PortSpec>, uplink: Option<Tap>) -> Result<Arc<Switch>, NetError> {
        let mut by_mac = HashMap::new();
        let mut sockets = HashSet::new();
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
    pub(super) fn touched(&self) -> Touched {
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
    pub(super) fn forward(&self, from: Source, frame: &Frame<'_>, touched: &mut Touched) {
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

    pub(super) fn learn(&self, mac: MacAddr) {
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
            Err(e) => {
                // A guest's used ring it broke: rate-limited.
                static LIMIT: Limiter = Limiter::new(8, std::time::Duration::from_secs(1));
                if let Some(n) = LIMIT.allow() {
                    warn!(port = %port.spec.socket.display(), "cannot add used entry: {e}{}", suppressed_note(n));
                }
            }
        }
    }

    /// Raises the receive interrupt of every touched port that needs one.
    pub(super) fn notify(&self, touched: &mut Touched) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_refuses_duplicate_macs_and_sockets() {
        let p = |s: &str, m: &str| PortSpec {
            socket: s.into(),
            mac: m.parse().unwrap(),
            memory_limit: None,
            frontend_uid: None,
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
}
