//! The vhost-user-vsock device of one partition's connection: config space
//! (the partition's CID), publishing its rx ring to the relay, and the tx
//! path (take a batch off the ring, check each header, relay, complete).

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::packet::{Header, Op, HDR_LEN};
use super::relay::{Payload, Relay, RxPath, VsockPort};
use super::stats::VsockStats;
use super::{MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE, TX_BATCH, TX_QUEUE};
use crate::chain::{gather, ChainWalker, Malformed, Segment};
use crate::copy::push_range;
use crate::device::{complete_read_only, Backend, DeviceModel, LogKey};
use crate::server::{Endpoint, Mem};

/// One partition's port of the relay, as served by the listener.
pub struct VsockEndpoint {
    relay: Arc<Relay>,
    port: Arc<VsockPort>,
}

impl VsockEndpoint {
    /// `port` of `relay`.
    pub fn new(relay: Arc<Relay>, port: Arc<VsockPort>) -> VsockEndpoint {
        VsockEndpoint { relay, port }
    }

    fn port(&self) -> &VsockPort {
        &self.port
    }

    /// The port served.
    pub fn vsock_port(&self) -> &Arc<VsockPort> {
        &self.port
    }
}

impl Endpoint for VsockEndpoint {
    type Model = VsockDevice;

    fn socket(&self) -> &Path {
        &self.port.socket
    }

    fn memory_limit(&self) -> Option<u64> {
        self.port.memory_limit
    }
    fn frontend_uid(&self) -> Option<u32> {
        self.port.frontend_uid
    }

    fn kind(&self) -> &'static str {
        "vsock"
    }

    fn new_model(self: &Arc<Self>, mem: &Mem) -> VsockDevice {
        VsockDevice::new(self.relay.clone(), self.port.clone(), mem.clone())
    }

    fn count_connection(&self) -> u64 {
        self.port().connected.store(true, Ordering::Relaxed);
        VsockStats::bump(&self.port().stats.connections)
    }

    fn count_refused_region(&self) {
        VsockStats::bump(&self.port().stats.refused_regions);
    }

    fn summary(&self) -> String {
        self.relay.summary(&self.port)
    }

    fn disconnected(&self) {
        self.port.connected.store(false, Ordering::Relaxed);
        self.relay.port_gone(&self.port);
    }

    fn retired(&self) -> bool {
        self.port.retired.load(Ordering::SeqCst)
    }
}

/// One checked packet taken off the tx ring.
struct TxPacket {
    header: Header,
    /// Its payload's segments in `VsockDevice::tx_segs`.
    segs: std::ops::Range<usize>,
}

/// virtio-vsock over vhost-user for one connection of one partition.
pub type VsockBackend = Backend<VsockDevice>;

/// The virtio-vsock device model of one connection.
pub struct VsockDevice {
    relay: Arc<Relay>,
    port: Arc<VsockPort>,
    mem: Mem,
    config: [u8; 8],
    walker: ChainWalker,
    /// Heads taken off the tx ring, to complete; false for a head outside
    /// the queue (no used entry can name it).
    heads: Vec<(u16, bool)>,
    packets: Vec<TxPacket>,
    tx_segs: Vec<Segment>,
    rx_published: bool,
}

impl VsockDevice {
    fn new(relay: Arc<Relay>, port: Arc<VsockPort>, mem: Mem) -> VsockDevice {
        let cid = u64::from(port.cid);
        VsockDevice {
            relay,
            port,
            mem,
            config: cid.to_le_bytes(),
            walker: ChainWalker::new(MAX_QUEUE_SIZE),
            heads: Vec::with_capacity(TX_BATCH),
            packets: Vec::with_capacity(TX_BATCH),
            tx_segs: Vec::with_capacity(TX_BATCH * 2),
            rx_published: false,
        }
    }

    fn publish_rx(&mut self, vrings: &[VringRwLock]) {
        if self.rx_published {
            return;
        }
        let Some(vring) = vrings.get(RX_QUEUE) else {
            return;
        };
        self.relay.publish_rx(
            &self.port,
            RxPath {
                vring: vring.clone(),
                mem: self.mem.clone(),
            },
        );
        self.rx_published = true;
    }

    /// Takes up to [`TX_BATCH`] chains off the tx ring (holding its lock
    /// only for that) and checks each; returns how many it took.
    fn take_tx_batch(&mut self, mem: &GuestMemoryMmap<()>, vring: &VringRwLock) -> usize {
        self.heads.clear();
        self.packets.clear();
        self.tx_segs.clear();
        let port = &*self.port;
        let (stats, name, cid) = (&port.stats, port.socket.display(), port.cid);
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
        while self.heads.len() < TX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match self.walker.walk_segments(mem, desc_table, queue_size, head) {
                Err(kind) => {
                    self.heads.push((head, kind != Malformed::BadHead));
                    let n = stats.count_malformed(kind);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(port = %name, "malformed transmit chain (head {head}): {}; returned with length 0 ({n} so far)", kind.name());
                    }
                }
                Ok(()) => {
                    self.heads.push((head, true));
                    let segs = self.walker.segments();
                    let total: usize = segs.iter().map(|s| s.len as usize).sum();
                    let mut hdr = [0u8; HDR_LEN];
                    let readable = !segs.iter().any(|s| s.write);
                    if !readable || gather(mem, segs, 0, &mut hdr).is_err() {
                        let n = VsockStats::bump(&stats.bad_buffer);
                        if n <= 8 || n.is_power_of_two() {
                            warn!(port = %name, "bad transmit buffer (head {head}, {total} bytes): needs a {HDR_LEN}-byte header in device-readable descriptors; dropped ({n} so far)");
                        }
                        continue;
                    }
                    let header = match Header::from_guest(&hdr, u64::from(cid)) {
                        Ok(h) => h,
                        Err(e) => {
                            let n = stats.count_bad_header(&e);
                            if n <= 8 || n.is_power_of_two() {
                                warn!(port = %name, "transmit packet (head {head}) refused: {e} ({n} so far)");
                            }
                            continue;
                        }
                    };
                    if total - HDR_LEN < header.len as usize {
                        let n = VsockStats::bump(&stats.bad_buffer);
                        if n <= 8 || n.is_power_of_two() {
                            warn!(port = %name, "transmit packet (head {head}) says {} payload bytes but its buffer holds {}; dropped ({n} so far)", header.len, total - HDR_LEN);
                        }
                        continue;
                    }
                    let start = self.tx_segs.len();
                    if header.op == Op::Rw {
                        push_range(segs, HDR_LEN, header.len as usize, &mut self.tx_segs);
                    }
                    self.packets.push(TxPacket {
                        header,
                        segs: start..self.tx_segs.len(),
                    });
                }
            }
        }
        self.heads.len()
    }

    /// Drains the tx ring: every packet is relayed, its payload copied from
    /// this guest's buffers straight into the receiver's, before the
    /// buffers go back to this guest.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        loop {
            let mem = self.mem.memory();
            let taken = self.take_tx_batch(&mem, vring);
            for p in &self.packets {
                let payload = if p.header.op == Op::Rw && p.header.len > 0 {
                    Payload::Guest {
                        mem: &mem,
                        segs: &self.tx_segs[p.segs.clone()],
                    }
                } else {
                    Payload::None
                };
                self.relay.relay(&self.port, &p.header, payload);
            }
            let heads = self.heads.iter().filter(|(_, ok)| *ok).map(|&(h, _)| h);
            complete_read_only(&mem, vring, heads, &self.port.socket.display())?;
            if taken < TX_BATCH {
                return Ok(());
            }
        }
    }
}

impl DeviceModel for VsockDevice {
    const LOG_KEY: LogKey = LogKey::Port;
    const NUM_QUEUES: usize = NUM_QUEUES;
    const MAX_QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;
    // Its worker connects to host listeners and starts their threads.
    const QUEUE_ROLE: Option<partvisor_seccomp::Role> = None;

    fn name(&self) -> std::path::Display<'_> {
        self.port.socket.display()
    }

    fn features(&self) -> u64 {
        // Stream sockets only: with no vsock feature bit, both sides act as
        // if VIRTIO_VSOCK_F_STREAM was negotiated (virtio 1.2 5.10.3).
        0
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    // No `update_memory`: `self.mem` is the same GuestMemoryAtomic the
    // daemon updates.

    fn kicked(&mut self, vrings: &[VringRwLock]) {
        self.publish_rx(vrings);
        // A receive kick means new buffers: deliver what waited for them.
        // (A transmit kick gets the same cheap check.)
        self.relay.flush(&self.port);
    }

    fn drains(&self, queue: usize) -> bool {
        // Receive buffers are not drained: they are filled as packets come
        // (a drain loop would spin on buffers nobody has packets for).
        queue == TX_QUEUE
    }

    fn process_queue(&mut self, _queue: usize, vring: &VringRwLock) -> io::Result<()> {
        self.process_tx(vring)
    }
}
