//! Interop with a frontend part-io did not write: QEMU's vhost-user-blk-pci
//! (guest memory from `memory-backend-memfd`, which QEMU seals) driven by
//! SeaBIOS's virtio-blk driver. The image's boot sector uses BIOS INT 13h to
//! write itself to sector 2 and reports the carry flag through
//! `isa-debug-exit`. Needs `qemu-system-x86_64` (Debian: qemu-system-x86);
//! runs under TCG, so no KVM is needed.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Real-mode boot sector: INT 13h AH=03 writes one sector (the boot sector
/// itself, at 0000:7C00) to CHS 0/0/2 of the boot drive (DL from the BIOS),
/// then `out 0xf4` 0x31 on success or 0x32 on failure (QEMU exits with
/// (value << 1) | 1: 99 or 101).
fn boot_sector() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x31, 0xC0,             // xor ax, ax
        0x8E, 0xC0,             // mov es, ax
        0xB8, 0x01, 0x03,       // mov ax, 0x0301   (write, 1 sector)
        0xB9, 0x02, 0x00,       // mov cx, 0x0002   (cylinder 0, sector 2)
        0xB6, 0x00,             // mov dh, 0        (head 0)
        0xBB, 0x00, 0x7C,       // mov bx, 0x7c00   (buffer)
        0xCD, 0x13,             // int 0x13
        0x72, 0x04,             // jc fail
        0xB0, 0x31,             // mov al, 0x31
        0xE6, 0xF4,             // out 0xf4, al
        0xB0, 0x32,             // fail: mov al, 0x32
        0xE6, 0xF4,             // out 0xf4, al
        0xF4, 0xEB, 0xFD,       // hlt; jmp hlt
    ];
    let mut s = vec![0u8; 512];
    s[..code.len()].copy_from_slice(code);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// Boots QEMU against `socket`; returns QEMU's exit code.
fn boot_qemu(socket: &std::path::Path) -> i32 {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "pc", "-accel", "tcg", "-m", "64M", "-nodefaults"])
        .args(["-display", "none", "-monitor", "none", "-serial", "none"])
        .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,bootindex=1"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 is needed for this test (Debian: qemu-system-x86)");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not finish booting the test boot sector");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn image_with_boot_sector(dir: &std::path::Path) -> Vec<u8> {
    let mut image = vec![0u8; 1 << 20];
    image[..512].copy_from_slice(&boot_sector());
    std::fs::write(dir.join("img0.raw"), &image).unwrap();
    image
}

#[test]
fn qemu_seabios_boots_from_part_io_and_writes_through_it() {
    let dir = setup(0, 0);
    image_with_boot_sector(dir.path());
    let spec = export(dir.path(), 0, "");
    let p = PartIo::spawn(dir, &[spec]);
    assert_eq!(
        boot_qemu(&sock(p.dir.path(), 0)),
        99,
        "INT 13h write failed"
    );
    let img = p.dir.path().join("img0.raw");
    assert_eq!(read_file_range(&img, 512, 512), boot_sector());
    let log = p.wait_log("disconnected;");
    assert!(log.contains("refused_regions=0"), "{log}");
}

#[test]
fn qemu_seabios_write_to_read_only_export_fails_and_file_is_unchanged() {
    let dir = setup(0, 0);
    let original = image_with_boot_sector(dir.path());
    let spec = export(dir.path(), 0, ",readonly");
    let p = PartIo::spawn(dir, &[spec]);
    assert_eq!(
        boot_qemu(&sock(p.dir.path(), 0)),
        101,
        "INT 13h write succeeded"
    );
    assert_eq!(
        std::fs::read(p.dir.path().join("img0.raw")).unwrap(),
        original
    );
}
