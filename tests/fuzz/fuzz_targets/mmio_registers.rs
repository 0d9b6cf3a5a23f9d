//! A guest's accesses to a virtio-mmio device window, any offsets, sizes
//! and values, in any order: the register file answers every read, clamps
//! what it must, activates at most once per DRIVER_OK, and never accepts
//! features it did not offer.
//!
//! Input: the device kind (1 byte), then accesses of 8 bytes each: offset
//! (2 bytes), size and direction (1 byte), 1 spare, value (4 bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use part_vmm::virtio::{
    DeviceKind, Effect, Registers, QUEUE_MAX, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

const OFFERED: u64 = (1 << 32) | (1 << 28) | 0x3;

fuzz_target!(|data: &[u8]| {
    let Some((&k, accesses)) = data.split_first() else {
        return;
    };
    let kind = match k % 3 {
        0 => DeviceKind::Block,
        1 => DeviceKind::Net,
        _ => DeviceKind::Vsock { cid: 3 },
    };
    let mut r = Registers::new("fuzz".into(), kind, OFFERED, vec![0xa5; 12]);
    let mut active = false;
    for a in accesses.chunks_exact(8) {
        let off = u64::from(u16::from_le_bytes([a[0], a[1]])) & 0x1ff;
        let size = 1usize << (a[2] & 3);
        let value = [a[4], a[5], a[6], a[7]];
        if a[2] & 4 == 0 {
            let mut buf = [0u8; 8];
            r.read(off, &mut buf[..size]);
        } else {
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&value);
            match r.write(off, &buf[..size]) {
                Effect::Activate => {
                    assert!(!active, "activated twice without a reset");
                    assert_eq!(r.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
                    assert_eq!(r.status() & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
                    active = true;
                }
                Effect::Reset => {
                    r.reset(false);
                    active = false;
                }
                Effect::None => {}
            }
        }
        if r.status() & STATUS_DRIVER_OK != 0 {
            assert_ne!(
                r.status() & STATUS_FEATURES_OK,
                0,
                "DRIVER_OK without FEATURES_OK"
            );
        }
        if r.status() & STATUS_FEATURES_OK != 0 {
            assert_eq!(
                r.driver_features() & !OFFERED,
                0,
                "unoffered features accepted"
            );
        }
        assert!(r.queues().iter().all(|q| q.num <= QUEUE_MAX));
    }
});
