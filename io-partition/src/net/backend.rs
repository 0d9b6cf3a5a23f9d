//! The vhost-user-net device of one port's connection: config space and
//! features, publishing the receive ring to the switch, and the transmit
//! path (take a batch off the ring, check each frame, forward, complete).

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::frame::{mac_at, Body, Frame, Source};
use super::stats::bump;
use super::switch::{Port, RxPath, Switch, Touched};
use super::{
    CONFIG_LEN, ETH_HDR, HDR_LEN, MAX_FRAME, MAX_QUEUE_SIZE, MIN_FRAME, NUM_BUFFERS_OFFSET,
    NUM_QUEUES, RX_QUEUE, TX_BATCH, TX_QUEUE,
};
use crate::chain::{gather, ChainWalker, Malformed, Segment};
use crate::copy::push_tail;
use crate::device::{complete_read_only, Backend, DeviceModel, LogKey};
use crate::server::{Endpoint, Mem};

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
    type Model = NetDevice;

    fn socket(&self) -> &Path {
        &self.port().spec.socket
    }

    fn memory_limit(&self) -> Option<u64> {
        self.port().spec.memory_limit
    }
    fn frontend_uid(&self) -> Option<u32> {
        self.port().spec.frontend_uid
    }

    fn kind(&self) -> &'static str {
        "net"
    }

    fn new_model(self: &Arc<Self>, mem: &Mem) -> NetDevice {
        NetDevice::new(self.switch.clone(), self.index, mem.clone())
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
        p.stats.summary(p.spec.mac)
    }

    fn disconnected(&self) {
        let p = self.port();
        *p.rx() = None;
        p.connected.store(false, Ordering::Relaxed);
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
pub type NetBackend = Backend<NetDevice>;

/// The virtio-net device model of one connection to one switch port.
pub struct NetDevice {
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
    rx_published: bool,
}

impl NetDevice {
    fn new(switch: Arc<Switch>, index: usize, mem: Mem) -> NetDevice {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&switch.ports[index].spec.mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&1500u16.to_le_bytes());
        let touched = switch.touched();
        NetDevice {
            switch,
            index,
            mem,
            config,
            walker: ChainWalker::new(MAX_QUEUE_SIZE),
            tx: Vec::with_capacity(TX_BATCH),
            tx_segs: Vec::with_capacity(TX_BATCH * 4),
            touched,
            rx_published: false,
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
    /// [`NetDevice::complete_tx`].
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
                        warn!(port = %port.spec.socket.display(), "frame from source {} dropped: the port's MAC is {} ({n} so far)", mac_at(&f.eth[6..12]), port.spec.mac);
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
            let heads = self.tx.iter().filter(|e| e.complete).map(|e| e.head);
            complete_read_only(
                &mem,
                vring,
                heads,
                &self.switch.ports[self.index].spec.socket.display(),
            )?;
            if taken < TX_BATCH {
                return Ok(());
            }
        }
    }
}

impl DeviceModel for NetDevice {
    const LOG_KEY: LogKey = LogKey::Port;
    const NUM_QUEUES: usize = NUM_QUEUES;
    const MAX_QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;
    const QUEUE_ROLE: Option<partvisor_seccomp::Role> = Some(partvisor_seccomp::Role::IoQueue);

    fn name(&self) -> std::path::Display<'_> {
        self.port().spec.socket.display()
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn config(&self) -> &[u8] {
        &self.config
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

    // No `update_memory`: `self.mem` is the same GuestMemoryAtomic the
    // daemon updates.

    fn kicked(&mut self, vrings: &[VringRwLock]) {
        self.publish_rx(vrings);
    }

    fn drains(&self, queue: usize) -> bool {
        // New receive buffers: frames are never queued in part-io, so there
        // is nothing to do beyond having published the ring.
        queue == TX_QUEUE
    }

    fn process_queue(&mut self, _queue: usize, vring: &VringRwLock) -> io::Result<()> {
        self.process_tx(vring)
    }
}
