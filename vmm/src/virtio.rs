//! virtio-mmio transport (virtio 1.x, modern only) whose devices are
//! vhost-user frontends: the device model lives in an I/O partition
//! (`part-io`, or any vhost-user backend), which maps the guest memfd and
//! serves the queues; part-vmm only negotiates and wires the fds.
//!
//! Data path: the guest's QueueNotify write hits an ioeventfd (no exit) that
//! is the backend's kick; the backend's call eventfd is an irqfd into the
//! guest. The VMM is not on it.
//!
//! No maintained crate publishes a device-side virtio-mmio register file
//! (rust-vmm's `virtio-device` is unpublished), so the transport's registers
//! are implemented here; queues are the backend's business (virtio-queue
//! there).

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config as cfg;
use virtio_bindings::virtio_mmio as mmio;
use virtio_bindings::virtio_net as net;
use virtio_bindings::virtio_ring as ring;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::layout;

// Register offsets (virtio 1.2, 4.2.2), from virtio-bindings, as MMIO
// window offsets.
const fn reg(offset: u32) -> u64 {
    offset as u64
}
const MAGIC_VALUE: u64 = reg(mmio::VIRTIO_MMIO_MAGIC_VALUE);
const VERSION: u64 = reg(mmio::VIRTIO_MMIO_VERSION);
const DEVICE_ID: u64 = reg(mmio::VIRTIO_MMIO_DEVICE_ID);
const VENDOR_ID: u64 = reg(mmio::VIRTIO_MMIO_VENDOR_ID);
const DEVICE_FEATURES: u64 = reg(mmio::VIRTIO_MMIO_DEVICE_FEATURES);
const DEVICE_FEATURES_SEL: u64 = reg(mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL);
const DRIVER_FEATURES: u64 = reg(mmio::VIRTIO_MMIO_DRIVER_FEATURES);
const DRIVER_FEATURES_SEL: u64 = reg(mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL);
const QUEUE_SEL: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_SEL);
const QUEUE_NUM_MAX: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_NUM_MAX);
const QUEUE_NUM: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_NUM);
const QUEUE_READY: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_READY);
const QUEUE_NOTIFY: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
const INTERRUPT_STATUS: u64 = reg(mmio::VIRTIO_MMIO_INTERRUPT_STATUS);
const INTERRUPT_ACK: u64 = reg(mmio::VIRTIO_MMIO_INTERRUPT_ACK);
const STATUS: u64 = reg(mmio::VIRTIO_MMIO_STATUS);
const QUEUE_DESC_LOW: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_DESC_LOW);
const QUEUE_DESC_HIGH: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH);
const QUEUE_DRIVER_LOW: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW);
const QUEUE_DRIVER_HIGH: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
const QUEUE_DEVICE_LOW: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_USED_LOW);
const QUEUE_DEVICE_HIGH: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_USED_HIGH);
const CONFIG_GENERATION: u64 = reg(mmio::VIRTIO_MMIO_CONFIG_GENERATION);
const CONFIG: u64 = reg(mmio::VIRTIO_MMIO_CONFIG);

const MMIO_MAGIC: u32 = u32::from_le_bytes(*b"virt");
const MMIO_VERSION: u32 = 2;
/// "PVSR" — partvisor's virtio vendor id.
const VENDOR: u32 = u32::from_le_bytes(*b"PVSR");

pub const STATUS_DRIVER_OK: u32 = cfg::VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = cfg::VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_NEEDS_RESET: u32 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET;

pub const INT_VRING: u32 = mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = mmio::VIRTIO_MMIO_INT_CONFIG;

const fn bit(n: u32) -> u64 {
    1 << n
}
pub const VIRTIO_F_VERSION_1: u64 = bit(cfg::VIRTIO_F_VERSION_1);
const VIRTIO_RING_F_INDIRECT_DESC: u64 = bit(ring::VIRTIO_RING_F_INDIRECT_DESC);
const VIRTIO_RING_F_EVENT_IDX: u64 = bit(ring::VIRTIO_RING_F_EVENT_IDX);
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Device-specific feature bits 0..24.
const DEVICE_FEATURE_MASK: u64 = (1 << 24) - 1;
/// Hidden so a block device has exactly one queue.
const VIRTIO_BLK_F_MQ: u64 = bit(virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ);
/// Hidden so a net device has exactly one queue pair and no control queue.
const VIRTIO_NET_CTRL_FEATURES: u64 = bit(net::VIRTIO_NET_F_CTRL_VQ)
    | bit(net::VIRTIO_NET_F_CTRL_RX)
    | bit(net::VIRTIO_NET_F_CTRL_VLAN)
    | bit(net::VIRTIO_NET_F_CTRL_RX_EXTRA)
    | bit(net::VIRTIO_NET_F_GUEST_ANNOUNCE)
    | bit(net::VIRTIO_NET_F_MQ)
    | bit(net::VIRTIO_NET_F_CTRL_MAC_ADDR);

/// Device types part-vmm can front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Net,
    /// virtio-vsock for the guest with CID `cid`.
    Vsock {
        cid: u32,
    },
}

impl DeviceKind {
    fn id(self) -> u32 {
        match self {
            DeviceKind::Net => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            DeviceKind::Block => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            DeviceKind::Vsock { .. } => virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK,
        }
    }
    fn config_size(self) -> u32 {
        match self {
            // struct virtio_blk_config, virtio 1.2 5.2.4.
            DeviceKind::Block => 60,
            // mac[6], status, max_virtqueue_pairs, mtu (virtio 1.2 5.1.4).
            DeviceKind::Net => 12,
            // guest_cid, le64 (virtio 1.2 5.10.4).
            DeviceKind::Vsock { .. } => 8,
        }
    }
    /// Queues the driver sees.
    fn queues(self) -> usize {
        match self {
            DeviceKind::Block => 1,
            // receiveq, transmitq.
            DeviceKind::Net => 2,
            // rx, tx, event.
            DeviceKind::Vsock { .. } => 3,
        }
    }
    /// Queues handed to the backend: all but vsock's event queue, which
    /// belongs to the device model (as in QEMU's vhost-user-vsock), so it is
    /// the VMM, not a backend, that tells the guest its transport was reset.
    fn backend_queues(self) -> usize {
        match self {
            DeviceKind::Vsock { .. } => 2,
            k => k.queues(),
        }
    }
    /// Device-specific features part-vmm never passes through.
    fn hidden_features(self) -> u64 {
        match self {
            DeviceKind::Block => VIRTIO_BLK_F_MQ,
            DeviceKind::Net => VIRTIO_NET_CTRL_FEATURES,
            DeviceKind::Vsock { .. } => 0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "blk",
            DeviceKind::Net => "net",
            DeviceKind::Vsock { .. } => "vsock",
        }
    }
}

/// Queue size offered to the driver.
pub const QUEUE_MAX: u16 = 256;

#[derive(Debug, Default, Clone, Copy)]
struct QueueRegs {
    num: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

fn set_low(v: &mut u64, x: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(x);
}
fn set_high(v: &mut u64, x: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
}

/// The backend's features as offered to the driver: device bits minus the
/// hidden ones, indirect descriptors, event index and VERSION_1; never the
/// vhost-user-only bit, packed rings or platform/IOMMU bits.
pub fn offered_features(kind: DeviceKind, backend: u64) -> u64 {
    let mask = (DEVICE_FEATURE_MASK & !kind.hidden_features())
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_F_VERSION_1;
    backend & mask
}

/// Guest-physical window and interrupt of virtio-mmio transport `index`.
pub fn slot(index: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_BASE + index as u64 * layout::VIRTIO_MMIO_SIZE,
        layout::VIRTIO_GSI_BASE + index as u32,
    )
}

/// The cmdline word announcing transport `index` (Linux syntax).
pub fn cmdline_word(index: usize) -> String {
    let (base, gsi) = slot(index);
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

/// The vsock config space (`guest_cid`, le64) for the partition with CID
/// `cid`. A backend that answered GET_CONFIG (`from_backend` not all zero)
/// must name that CID: one that names another serves another partition's
/// socket, and the guest must not come up with someone else's address.
fn vsock_config(socket: &Path, cid: u32, from_backend: &[u8]) -> Result<Vec<u8>> {
    let mut le = [0u8; 8];
    let n = from_backend.len().min(8);
    le[..n].copy_from_slice(&from_backend[..n]);
    let got = u64::from_le_bytes(le);
    if got != 0 && got != u64::from(cid) {
        return Err(Error::VsockCidMismatch {
            socket: socket.to_path_buf(),
            expected: cid,
            got,
        });
    }
    Ok(u64::from(cid).to_le_bytes().to_vec())
}

/// One virtio-mmio transport fronting one vhost-user backend.
pub struct VirtioMmio {
    pub name: String,
    pub base: u64,
    pub gsi: u32,
    kind: DeviceKind,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    config: Vec<u8>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    status: u32,
    config_generation: u32,
    config_pending: bool,
    active: bool,
    broken: bool,
    kicks: Vec<EventFd>,
    irq: EventFd,
    memory: GuestMemoryMmap,
}

fn vhost_err(socket: &Path, what: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    let socket = socket.to_path_buf();
    move |source| Error::Backend {
        socket,
        what,
        source,
    }
}

impl VirtioMmio {
    /// Connects to the backend at `socket`, negotiates what can be
    /// negotiated before the guest runs, and wires kicks and interrupts.
    pub fn connect(
        index: usize,
        kind: DeviceKind,
        socket: &Path,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
    ) -> Result<VirtioMmio> {
        let (base, gsi) = slot(index);
        let err = |what| vhost_err(socket, what);
        let mut frontend = Frontend::connect(socket, kind.backend_queues() as u64).map_err(
            vhost_err(socket, "cannot connect (is the I/O partition running?)"),
        )?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::BackendNotModern {
                socket: socket.to_path_buf(),
            });
        }
        let mut config = vec![0u8; kind.config_size() as usize];
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            let protocol_features = offered
                & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is acknowledged, so a refusal (e.g. of an
                // unsealed memory table) is reported by the request itself.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
                let (_, payload) = frontend
                    .get_config(
                        0,
                        kind.config_size(),
                        VhostUserConfigFlags::WRITABLE,
                        &config,
                    )
                    .map_err(err("GET_CONFIG"))?;
                config = payload;
            }
        }
        if let DeviceKind::Vsock { cid } = kind {
            config = vsock_config(socket, cid, &config)?;
        }
        let kicks = (0..kind.backend_queues())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("eventfd")))
            .collect::<Result<Vec<_>>>()?;
        for (q, kick) in kicks.iter().enumerate() {
            vm.register_ioevent(kick, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(Error::kvm("KVM_IOEVENTFD (virtio kick)"))?;
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("eventfd"))?;
        vm.register_irqfd(&irq, gsi)
            .map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
        tracing::info!(
            "virtio-{}{index}: {} at {base:#x} gsi {gsi}, backend features {backend_features:#x}",
            kind.name(),
            socket.display()
        );
        Ok(VirtioMmio {
            name: format!("virtio-{}{index}", kind.name()),
            base,
            gsi,
            kind,
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
            config,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegs::default(); kind.queues()],
            status: 0,
            config_generation: 0,
            config_pending: false,
            active: false,
            broken: false,
            kicks,
            irq,
            memory: memory.clone(),
        })
    }

    /// The backend connection, watched by the event loop for hang-ups.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Features offered to the driver.
    fn device_features(&self) -> u64 {
        offered_features(self.kind, self.backend_features)
    }

    /// True when `addr` falls in this transport's window.
    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + layout::VIRTIO_MMIO_SIZE).contains(&addr)
    }

    fn queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        let off = addr - self.base;
        if off >= CONFIG {
            let start = (off - CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let v: u32 = match off {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.kind.id(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX if (self.queue_sel as usize) < self.queues.len() => u32::from(QUEUE_MAX),
            QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            // The backend raises used-ring interrupts itself, so the VMM
            // cannot know whether one is pending: report VRING always (a
            // Linux driver ignores an interrupt whose status reads 0), plus
            // CONFIG when a config change is pending.
            INTERRUPT_STATUS => INT_VRING | if self.config_pending { INT_CONFIG } else { 0 },
            STATUS => self.status,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let off = addr - self.base;
        if off >= CONFIG {
            // Block config is read-only for the driver (writeback is not offered).
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let before_driver_ok = self.status & STATUS_DRIVER_OK == 0;
        match off {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM if before_driver_ok => {
                if let Some(q) = self.queue() {
                    q.num = v.min(u32::from(QUEUE_MAX)) as u16;
                }
            }
            QUEUE_READY if before_driver_ok => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH
                if before_driver_ok =>
            {
                if let Some(q) = self.queue() {
                    match off {
                        QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                        QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                        QUEUE_DRIVER_LOW => set_low(&mut q.driver, v),
                        QUEUE_DRIVER_HIGH => set_high(&mut q.driver, v),
                        QUEUE_DEVICE_LOW => set_low(&mut q.device, v),
                        _ => set_high(&mut q.device, v),
                    }
                }
            }
            INTERRUPT_ACK => {
                if v & INT_CONFIG != 0 {
                    self.config_pending = false;
                }
            }
            STATUS => self.write_status(v),
            // QueueNotify normally never exits (ioeventfd); a write with a
            // queue index that matches no ioeventfd lands here and is ignored.
            QUEUE_NOTIFY => {}
            _ => tracing::debug!(
                "{}: write {v:#x} to read-only or unknown register {off:#x}",
                self.name
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // A driver can retry in a loop: rate-limited.
                static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
                if let Some(n) = LIMIT.allow() {
                    tracing::warn!(
                        "{}: driver features {:#x} rejected (offered {:#x}; VERSION_1 required){}",
                        self.name,
                        self.driver_features,
                        self.device_features(),
                        suppressed_note(n)
                    );
                }
                // FEATURES_OK stays clear: the driver sees the refusal.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v | (self.status & STATUS_NEEDS_RESET);
        if newly_ok && !self.broken {
            if let Err(e) = self.activate() {
                tracing::error!("{}: activation failed: {e}; device needs reset", self.name);
                self.mark_needs_reset();
            }
        }
    }

    fn host_addr(&self, gpa: u64, len: usize) -> Option<u64> {
        let mem = &self.memory;
        mem.checked_offset(GuestAddress(gpa), len.saturating_sub(1))?;
        mem.get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    /// Hands memory and rings to the backend once the driver is ready.
    fn activate(&mut self) -> Result<()> {
        let socket = self.socket.clone();
        let err = |what| vhost_err(&socket, what);
        let features =
            self.driver_features | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES);
        self.frontend
            .set_features(features)
            .map_err(err("SET_FEATURES"))?;
        let regions = self
            .memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(err("memory region"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(err("SET_MEM_TABLE"))?;
        let backend_queues = self.kind.backend_queues();
        for (i, q) in self.queues.clone().iter().enumerate().take(backend_queues) {
            if !q.ready {
                continue;
            }
            let n = usize::from(q.num);
            let addr = |gpa: u64, len: usize, ring: &'static str| {
                self.host_addr(gpa, len)
                    .ok_or_else(|| Error::RingOutsideRam {
                        socket: socket.clone(),
                        queue: i,
                        ring,
                        gpa,
                    })
            };
            let cfg = VringConfigData {
                queue_max_size: QUEUE_MAX,
                queue_size: q.num,
                flags: 0,
                desc_table_addr: addr(q.desc, 16 * n, "descriptor")?,
                used_ring_addr: addr(q.device, 6 + 8 * n, "used")?,
                avail_ring_addr: addr(q.driver, 6 + 2 * n, "available")?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.num)
                .map_err(err("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &cfg)
                .map_err(err("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(err("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &self.irq)
                .map_err(err("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &self.kicks[i])
                .map_err(err("SET_VRING_KICK"))?;
            if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(err("SET_VRING_ENABLE"))?;
            }
        }
        self.active = true;
        // A driver can reset and activate in a loop: rate-limited.
        static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
        if let Some(n) = LIMIT.allow() {
            tracing::info!(
                "{}: active, features {:#x}{}",
                self.name,
                self.driver_features,
                suppressed_note(n)
            );
        }
        Ok(())
    }

    /// Driver reset: stop the backend's rings and forget the negotiation.
    fn reset(&mut self) {
        if self.active && !self.broken {
            for i in 0..self.kind.backend_queues() {
                if self.queues[i].ready {
                    if let Err(e) = self.frontend.get_vring_base(i) {
                        static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
                        if let Some(n) = LIMIT.allow() {
                            tracing::warn!(
                                "{}: GET_VRING_BASE on reset: {e}{}",
                                self.name,
                                suppressed_note(n)
                            );
                        }
                    }
                }
            }
        }
        self.active = false;
        self.status = if self.broken { STATUS_NEEDS_RESET } else { 0 };
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.config_pending = false;
        self.queues = vec![QueueRegs::default(); self.kind.queues()];
    }

    fn mark_needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.config_pending = true;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("{}: cannot raise the config interrupt: {e}", self.name);
        }
    }

    /// The backend went away: the device needs reset, the VMM keeps running.
    pub fn backend_gone(&mut self) {
        if self.broken {
            return;
        }
        self.broken = true;
        self.active = false;
        tracing::error!(
            "{}: vhost-user backend {} disconnected; device needs reset",
            self.name,
            self.socket.display()
        );
        self.mark_needs_reset();
    }

    pub fn status(&self) -> u32 {
        self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_features_hide_queue_count_control_and_vhost_only_bits() {
        let all = u64::MAX;
        let blk = offered_features(DeviceKind::Block, all);
        assert_eq!(blk & VIRTIO_BLK_F_MQ, 0);
        assert_ne!(blk & VIRTIO_F_VERSION_1, 0);
        assert_eq!(blk & VHOST_USER_F_PROTOCOL_FEATURES, 0);
        assert_eq!(blk & (1 << 34), 0, "packed rings are not offered");
        let net = offered_features(DeviceKind::Net, all);
        assert_eq!(net & (1 << 22), 0, "VIRTIO_NET_F_MQ hidden");
        assert_eq!(net & (1 << 17), 0, "VIRTIO_NET_F_CTRL_VQ hidden");
        assert_ne!(net & (1 << 5), 0, "VIRTIO_NET_F_MAC passes");
        assert_eq!(offered_features(DeviceKind::Net, 1 << 5), 1 << 5);
    }

    #[test]
    fn vsock_config_is_the_granted_cid_and_a_backend_naming_another_is_refused() {
        let s = Path::new("/v.sock");
        assert_eq!(vsock_config(s, 7, &[0; 8]).unwrap(), 7u64.to_le_bytes());
        assert_eq!(
            vsock_config(s, 7, &7u64.to_le_bytes()).unwrap(),
            7u64.to_le_bytes()
        );
        let e = vsock_config(s, 7, &9u64.to_le_bytes()).unwrap_err();
        assert!(matches!(
            e,
            Error::VsockCidMismatch {
                expected: 7,
                got: 9,
                ..
            }
        ));
        assert!(e.is_bad_input());
        let vsock = DeviceKind::Vsock { cid: 3 };
        assert_eq!(
            (vsock.id(), vsock.queues(), vsock.backend_queues()),
            (19, 3, 2)
        );
        assert_eq!(vsock.config_size(), 8);
    }

    #[test]
    fn slots_and_cmdline_words_follow_the_layout() {
        assert_eq!(slot(0), (0xd000_0000, 16));
        assert_eq!(slot(3), (0xd000_3000, 19));
        assert_eq!(cmdline_word(1), "virtio_mmio.device=4K@0xd0001000:17");
    }
}
