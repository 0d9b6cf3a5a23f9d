//! The virtio-mmio register file (virtio 1.2, 4.2.2) of one transport: what
//! the guest reads and writes in the device's MMIO window, apart from the
//! vhost-user frontend behind it, so that every access can be checked (and
//! fuzzed) without a backend. A write that must reach the backend returns
//! an [`Effect`] for the transport ([`super::VirtioMmio`]) to carry out.
//!
//! What it must never do: trust a value the guest wrote (queue sizes are
//! clamped, selectors bounds-checked, features checked against the offer),
//! index out of range, or log at a rate the guest chooses.

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use std::time::Duration;

use virtio_bindings::virtio_config as cfg;
use virtio_bindings::virtio_mmio as mmio;

use super::{DeviceKind, VIRTIO_F_VERSION_1};

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
pub(super) const QUEUE_NOTIFY: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
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

/// Queue size offered to the driver.
pub const QUEUE_MAX: u16 = 256;

/// One queue's registers as the driver set them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegs {
    /// Size, at most [`QUEUE_MAX`].
    pub num: u16,
    pub ready: bool,
    /// Guest-physical addresses of the descriptor table, the driver
    /// (available) and the device (used) rings.
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

fn set_low(v: &mut u64, x: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(x);
}
fn set_high(v: &mut u64, x: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
}

/// What a register write asks of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the registers.
    None,
    /// The driver set DRIVER_OK: hand memory and rings to the backend.
    Activate,
    /// The driver wrote 0 to STATUS: stop the backend's rings, then
    /// [`Registers::reset`].
    Reset,
}

/// The registers of one transport.
#[derive(Debug, Clone)]
pub struct Registers {
    name: String,
    kind: DeviceKind,
    device_features: u64,
    config: Vec<u8>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    status: u32,
    config_generation: u32,
    config_pending: bool,
}

impl Registers {
    /// Registers of a `kind` device named `name` (for logs) offering
    /// `device_features`, with config space `config`.
    pub fn new(name: String, kind: DeviceKind, device_features: u64, config: Vec<u8>) -> Self {
        Registers {
            name,
            kind,
            device_features,
            config,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegs::default(); kind.queues()],
            status: 0,
            config_generation: 0,
            config_pending: false,
        }
    }

    /// The transport's name, for logs (`virtio-blk0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The queues as the driver set them.
    pub fn queues(&self) -> &[QueueRegs] {
        &self.queues
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at offset `off` of the window.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        if off >= CONFIG {
            let start = off - CONFIG;
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(start)
                    .ok()
                    .and_then(|s| s.checked_add(i))
                    .and_then(|at| self.config.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        let v: u32 = match off {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.kind.id(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX if (self.queue_sel as usize) < self.queues.len() => u32::from(QUEUE_MAX),
            QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
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

    /// A write of `data` at offset `off` of the window.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Effect {
        if off >= CONFIG {
            // Config space is read-only for the driver (writeback is not offered).
            return Effect::None;
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
            STATUS => return self.write_status(v),
            // QueueNotify normally never exits (ioeventfd); a write with a
            // queue index that matches no ioeventfd lands here and is ignored.
            QUEUE_NOTIFY => {}
            _ => tracing::debug!(
                "{}: write {v:#x} to read-only or unknown register {off:#x}",
                self.name
            ),
        }
        Effect::None
    }

    fn write_status(&mut self, v: u32) -> Effect {
        if v == 0 {
            return Effect::Reset;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // A driver can retry in a loop: rate-limited.
                static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
                if let Some(n) = LIMIT.allow() {
                    tracing::warn!(
                        "{}: driver features {:#x} rejected (offered {:#x}; VERSION_1 required){}",
                        self.name,
                        self.driver_features,
                        self.device_features,
                        suppressed_note(n)
                    );
                }
                // FEATURES_OK stays clear: the driver sees the refusal (and
                // a DRIVER_OK in the same write does not stick either).
                self.status |= v & !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
                return Effect::None;
            }
        }
        // Status bits are only ever added until a reset (virtio 1.2, 2.1.2:
        // the driver never clears one), so DRIVER_OK activates once.
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        if newly_ok && (self.status | v) & STATUS_FEATURES_OK == 0 {
            // DRIVER_OK before the features were accepted: the device
            // would run on features nobody checked.
            static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
            if let Some(n) = LIMIT.allow() {
                tracing::warn!(
                    "{}: DRIVER_OK without FEATURES_OK refused{}",
                    self.name,
                    suppressed_note(n)
                );
            }
            self.status |= v & !STATUS_DRIVER_OK;
            return Effect::None;
        }
        self.status |= v;
        if newly_ok {
            Effect::Activate
        } else {
            Effect::None
        }
    }

    /// Forgets the negotiation (a driver reset); a broken device keeps
    /// reading NEEDS_RESET.
    pub fn reset(&mut self, broken: bool) {
        self.status = if broken { STATUS_NEEDS_RESET } else { 0 };
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.config_pending = false;
        self.queues = vec![QueueRegs::default(); self.kind.queues()];
    }

    /// Sets NEEDS_RESET and a pending config change (the transport raises
    /// the interrupt).
    pub fn mark_needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.config_pending = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Registers {
        Registers::new(
            "t".into(),
            DeviceKind::Net,
            VIRTIO_F_VERSION_1 | 1,
            vec![1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0],
        )
    }

    fn read32(r: &Registers, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_driver_negotiates_sets_up_queues_and_activates_once() {
        let mut r = regs();
        assert_eq!(read32(&r, MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(
            r.write(DRIVER_FEATURES_SEL, &1u32.to_le_bytes()),
            Effect::None
        );
        r.write(DRIVER_FEATURES, &1u32.to_le_bytes());
        r.write(DRIVER_FEATURES_SEL, &0u32.to_le_bytes());
        r.write(DRIVER_FEATURES, &1u32.to_le_bytes());
        r.write(STATUS, &STATUS_FEATURES_OK.to_le_bytes());
        assert_eq!(r.status() & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        r.write(QUEUE_SEL, &1u32.to_le_bytes());
        r.write(QUEUE_NUM, &100_000u32.to_le_bytes());
        r.write(QUEUE_READY, &1u32.to_le_bytes());
        assert_eq!(r.queues()[1].num, QUEUE_MAX);
        assert!(r.queues()[1].ready);
        let ok = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(r.write(STATUS, &ok.to_le_bytes()), Effect::Activate);
        assert_eq!(r.write(STATUS, &ok.to_le_bytes()), Effect::None);
        // Clearing DRIVER_OK without a reset neither sticks nor activates
        // again.
        r.write(STATUS, &STATUS_FEATURES_OK.to_le_bytes());
        assert_eq!(r.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        assert_eq!(r.write(STATUS, &ok.to_le_bytes()), Effect::None);
        // Queue registers are frozen once the driver is ready.
        r.write(QUEUE_NUM, &8u32.to_le_bytes());
        assert_eq!(r.queues()[1].num, QUEUE_MAX);
        assert_eq!(r.write(STATUS, &0u32.to_le_bytes()), Effect::Reset);
        r.reset(false);
        assert_eq!(r.status(), 0);
        assert_eq!(r.queues()[1], QueueRegs::default());
    }

    #[test]
    fn unknown_features_are_refused_and_out_of_range_accesses_read_zero() {
        let mut r = regs();
        r.write(DRIVER_FEATURES, &2u32.to_le_bytes());
        r.write(STATUS, &STATUS_FEATURES_OK.to_le_bytes());
        assert_eq!(r.status() & STATUS_FEATURES_OK, 0);
        // Not even when DRIVER_OK comes in the same write.
        let both = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(r.write(STATUS, &both.to_le_bytes()), Effect::None);
        assert_eq!(r.status() & both, 0);
        // Nor does the device run without accepted features.
        assert_eq!(
            r.write(STATUS, &STATUS_DRIVER_OK.to_le_bytes()),
            Effect::None
        );
        assert_eq!(r.status() & STATUS_DRIVER_OK, 0);
        r.write(QUEUE_SEL, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&r, QUEUE_NUM_MAX), 0);
        assert_eq!(read32(&r, QUEUE_READY), 0);
        let mut far = [0xffu8; 8];
        r.read(u64::MAX, &mut far);
        assert_eq!(far, [0; 8]);
        let mut cfg = [0u8; 8];
        r.read(CONFIG + 4, &mut cfg);
        assert_eq!(cfg, [5, 6, 0, 0, 0, 0, 0, 0]);
    }
}
