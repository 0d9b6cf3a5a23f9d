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
//! are implemented here (`registers.rs`, apart from the vhost-user side so
//! that every guest access can be tested and fuzzed without a backend);
//! queues are the backend's business (virtio-queue
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
use virtio_bindings::virtio_net as net;
use virtio_bindings::virtio_ring as ring;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::layout;

pub mod registers;

use registers::QUEUE_NOTIFY;
pub use registers::{
    Effect, Registers, INT_CONFIG, INT_VRING, QUEUE_MAX, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};

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
    pub base: u64,
    pub gsi: u32,
    kind: DeviceKind,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    regs: Registers,
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
            regs: Registers::new(
                format!("virtio-{}{index}", kind.name()),
                kind,
                offered_features(kind, backend_features),
                config,
            ),
            base,
            gsi,
            kind,
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
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

    /// True when `addr` falls in this transport's window.
    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + layout::VIRTIO_MMIO_SIZE).contains(&addr)
    }

    /// A guest read in the window (an address outside it reads as zero).
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        match addr.checked_sub(self.base) {
            Some(off) => self.regs.read(off, data),
            None => data.fill(0),
        }
    }

    /// A guest write in the window; what must reach the backend does.
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let Some(off) = addr.checked_sub(self.base) else {
            return;
        };
        match self.regs.write(off, data) {
            Effect::None => {}
            Effect::Reset => self.reset(),
            Effect::Activate if self.broken => {}
            Effect::Activate => {
                if let Err(e) = self.activate() {
                    tracing::error!(
                        "{}: activation failed: {e}; device needs reset",
                        self.regs.name()
                    );
                    self.mark_needs_reset();
                }
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
        let driver_features = self.regs.driver_features();
        let features = driver_features | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES);
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
        for (i, q) in self
            .regs
            .queues()
            .to_vec()
            .iter()
            .enumerate()
            .take(backend_queues)
        {
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
                self.regs.name(),
                driver_features,
                suppressed_note(n)
            );
        }
        Ok(())
    }

    /// Driver reset: stop the backend's rings and forget the negotiation.
    fn reset(&mut self) {
        if self.active && !self.broken {
            let ready: Vec<usize> = (0..self.kind.backend_queues())
                .filter(|&i| self.regs.queues().get(i).is_some_and(|q| q.ready))
                .collect();
            for i in ready {
                if let Err(e) = self.frontend.get_vring_base(i) {
                    static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
                    if let Some(n) = LIMIT.allow() {
                        tracing::warn!(
                            "{}: GET_VRING_BASE on reset: {e}{}",
                            self.regs.name(),
                            suppressed_note(n)
                        );
                    }
                }
            }
        }
        self.active = false;
        self.regs.reset(self.broken);
    }

    fn mark_needs_reset(&mut self) {
        self.regs.mark_needs_reset();
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(
                "{}: cannot raise the config interrupt: {e}",
                self.regs.name()
            );
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
            self.regs.name(),
            self.socket.display()
        );
        self.mark_needs_reset();
    }

    pub fn status(&self) -> u32 {
        self.regs.status()
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
