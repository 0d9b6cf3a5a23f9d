//! The guest's virtio-mmio discovery and virtio-blk driver against QEMU
//! microvm's virtio-blk-device (modern: `virtio-mmio.force-legacy=false`).
//!
//! With `acpi=off` QEMU appends `virtio_mmio.device=512@0xfeb00e00:12` to the
//! cmdline itself (the last of 8 transports, IRQ base 5). With ACPI on (the
//! default) it describes its 24 transports only in the DSDT, on a second
//! IOAPIC (GSI base 24), so the tests declare the one QEMU fills first
//! themselves: 0xfeb02e00, GSI 47. Runner: `common/mod.rs`.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{boot, debug_exit_status, Boot, Outcome};
use partvisor_test_guest::blk_pattern::{fill_block, BLOCK_SIZE};
use partvisor_test_guest::{
    fnv1a64, EXIT_BLK_NOT_REFUSED, EXIT_BLK_NO_DEVICE, EXIT_BLK_TIMEOUT, EXIT_BLK_VERIFY,
};
use std::path::PathBuf;

/// The device QEMU microvm (ACPI on) fills first, declared by hand.
const ACPI_DEVICE_WORD: &str = "virtio_mmio.device=512@0xfeb02e00:47";

/// A raw image file, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, bytes: &[u8]) -> Image {
        let path = std::env::temp_dir().join(format!(
            "partvisor-guest-blk-{}-{name}.raw",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        Image(path)
    }

    fn zeroed(name: &str, mib: usize) -> Image {
        Image::new(name, &vec![0u8; mib << 20])
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn block(seed: u64, n: u64) -> [u8; BLOCK_SIZE] {
    let mut b = [0u8; BLOCK_SIZE];
    fill_block(seed, n, &mut b);
    b
}

/// Boot with one virtio-blk-device on `image`; `drive_opts` / `dev_opts`
/// are appended to `-drive` / `-device`.
fn boot_blk(machine: &str, cmdline: &str, drive: &str, dev_opts: &str) -> Outcome {
    let args = [
        "-global".to_string(),
        "virtio-mmio.force-legacy=false".to_string(),
        "-drive".to_string(),
        format!("{drive},if=none,id=d0"),
        "-device".to_string(),
        format!("virtio-blk-device,drive=d0{dev_opts}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    boot(Boot {
        machine,
        cmdline,
        extra_args: &args,
        ..Boot::default()
    })
}

fn raw(image: &Image) -> String {
    format!("file={},format=raw", image.0.display())
}

fn has_line(out: &Outcome, line: &str) -> bool {
    out.report().lines.iter().any(|l| l == line)
}

fn lines_with(out: &Outcome, prefix: &str) -> Vec<String> {
    out.report()
        .lines
        .into_iter()
        .filter(|l| l.starts_with(prefix))
        .collect()
}

#[test]
fn written_blocks_land_in_the_image_and_verify_on_the_next_boot() {
    let image = Image::zeroed("write", 8);
    let out = boot_blk("microvm,acpi=off", "blk=write:42:64", &raw(&image), "");
    assert!(
        has_line(
            &out,
            "virtio: 0xfeb00e00 gsi 12 device 2 version 2 vendor 0x554d4551"
        ),
        "{out:#?}"
    );
    let ready = lines_with(&out, "blk: ready ");
    assert_eq!(ready.len(), 1, "{out:#?}");
    assert!(
        ready[0].starts_with("blk: ready capacity=16384 queue=256 ")
            && ready[0].ends_with(" ro=0 event_idx=1 indirect=1 flush=1"),
        "{ready:?}"
    );
    assert!(has_line(&out, "blk: wrote 64 blocks"), "{out:#?}");
    assert!(has_line(&out, "blk: flush ok"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");

    // The host sees exactly the pattern, and nothing past it.
    let data = image.bytes();
    for n in 0..64u64 {
        let at = n as usize * BLOCK_SIZE;
        assert!(
            data[at..at + BLOCK_SIZE] == block(42, n),
            "block {n} in the image"
        );
    }
    assert!(data[64 * BLOCK_SIZE..].iter().all(|&b| b == 0));

    let out = boot_blk("microvm,acpi=off", "blk=verify:42:64", &raw(&image), "");
    assert!(has_line(&out, "blk: verified 64 blocks ok"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");

    // One flipped byte in block 5, from the host: the next verify names it.
    let mut data = image.bytes();
    data[5 * BLOCK_SIZE + 1000] ^= 0x40;
    std::fs::write(&image.0, &data).unwrap();
    let out = boot_blk("microvm,acpi=off", "blk=verify:42:64", &raw(&image), "");
    assert!(has_line(&out, "blk: verify failed at block 5"), "{out:#?}");
    assert_eq!(out.report().exit, Some(EXIT_BLK_VERIFY));
    assert_eq!(
        out.status,
        debug_exit_status(EXIT_BLK_VERIFY as i32),
        "{out:#?}"
    );
}

#[test]
fn without_event_idx_and_indirect_descriptors_the_driver_still_works() {
    let image = Image::zeroed("plain", 8);
    let out = boot_blk(
        "microvm,acpi=off",
        "blk=write:3:40 blk=verify:3:40 blk=verify:4:1",
        &raw(&image),
        ",event_idx=off,indirect_desc=off",
    );
    let ready = lines_with(&out, "blk: ready ");
    assert!(
        ready.len() == 1 && ready[0].ends_with(" event_idx=0 indirect=0 flush=1"),
        "{out:#?}"
    );
    assert!(has_line(&out, "blk: wrote 40 blocks"), "{out:#?}");
    assert!(has_line(&out, "blk: verified 40 blocks ok"), "{out:#?}");
    assert!(has_line(&out, "blk: verify failed at block 0"), "{out:#?}");
    assert_eq!(out.report().exit, Some(EXIT_BLK_VERIFY), "{out:#?}");
}

#[test]
fn read_only_drive_refuses_the_write_with_ioerr_and_the_file_is_unchanged() {
    let mut content = vec![0u8; 8 << 20];
    for n in 0..4u64 {
        let at = n as usize * BLOCK_SIZE;
        content[at..at + BLOCK_SIZE].copy_from_slice(&block(9, n));
    }
    let image = Image::new("ro", &content);
    // ACPI on: the guest finds the transport from its own word and routes
    // GSI 47 through the MADT's second IOAPIC.
    let cmdline = format!("{ACPI_DEVICE_WORD} blk=expect-ro blk=verify:9:4");
    let out = boot_blk(
        "microvm",
        &cmdline,
        &format!("{},readonly=on", raw(&image)),
        "",
    );
    assert!(
        has_line(
            &out,
            "virtio: 0xfeb02e00 gsi 47 device 2 version 2 vendor 0x554d4551"
        ),
        "{out:#?}"
    );
    let ready = lines_with(&out, "blk: ready ");
    assert!(ready.len() == 1 && ready[0].contains(" ro=1 "), "{out:#?}");
    assert!(has_line(&out, "blk: write refused (ioerr)"), "{out:#?}");
    assert!(has_line(&out, "blk: verified 4 blocks ok"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
    assert_eq!(fnv1a64(&image.bytes()), fnv1a64(&content));
}

#[test]
fn expect_ro_on_a_writable_drive_fails_with_exit_15() {
    let image = Image::zeroed("rw", 8);
    let out = boot_blk("microvm,acpi=off", "blk=expect-ro", &raw(&image), "");
    assert!(
        has_line(&out, "blk: write accepted on a read-only device"),
        "{out:#?}"
    );
    assert_eq!(
        out.status,
        debug_exit_status(EXIT_BLK_NOT_REFUSED as i32),
        "{out:#?}"
    );
}

#[test]
fn get_id_reports_the_drive_serial() {
    let image = Image::zeroed("id", 1);
    let out = boot_blk(
        "microvm,acpi=off",
        "blk=id",
        &raw(&image),
        ",serial=pv-disk-7",
    );
    assert!(has_line(&out, "blk: id pv-disk-7"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

/// QEMU 7.2's answers: chains it rejects (loop, bad indirect table, no
/// writable descriptor) put the device in DEVICE_NEEDS_RESET with a config
/// interrupt; an over-long indirect chain and a buffer outside RAM are
/// completed. Whatever the answer, the guest must neither hang nor lose the
/// device: after each malformed request it verifies the disk again.
#[test]
fn malformed_requests_get_an_answer_and_the_device_keeps_working() {
    let image = Image::zeroed("bad", 8);
    let mut words = String::from("blk=write:5:8");
    for kind in ["loop", "long", "indirect", "oob", "nostatus"] {
        words += &format!(" blk=bad:{kind} blk=verify:5:8");
    }
    let out = boot_blk("microvm,acpi=off", &words, &raw(&image), "");
    for kind in ["loop", "indirect", "nostatus"] {
        assert!(
            has_line(&out, &format!("blk: bad={kind} needs-reset")),
            "{kind}: {out:#?}"
        );
    }
    for kind in ["long", "oob"] {
        assert_eq!(
            lines_with(&out, &format!("blk: bad={kind} used_len=")).len(),
            1,
            "{kind}: {out:#?}"
        );
    }
    assert_eq!(
        lines_with(&out, "blk: verified 8 blocks ok").len(),
        5,
        "{out:#?}"
    );
    assert!(!has_line(&out, "blk: timeout"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn long_chain_without_indirect_descriptors_wraps_the_ring_and_is_rejected() {
    let image = Image::zeroed("long", 1);
    let out = boot_blk(
        "microvm,acpi=off",
        "blk=write:1:2 blk=bad:long blk=verify:1:2",
        &raw(&image),
        ",indirect_desc=off",
    );
    assert!(has_line(&out, "blk: bad=long needs-reset"), "{out:#?}");
    assert!(has_line(&out, "blk: verified 2 blocks ok"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn a_device_that_does_not_answer_ends_in_a_bounded_timeout() {
    // null-co completes each request after 3 s; the guest gives up after a
    // 2 s period without progress.
    let started = std::time::Instant::now();
    let out = boot_blk(
        "microvm,acpi=off",
        "blk=verify:1:1 exit=9",
        "driver=null-co,size=1M,latency-ns=3000000000",
        "",
    );
    assert!(has_line(&out, "blk: timeout"), "{out:#?}");
    assert_eq!(out.report().exit, Some(EXIT_BLK_TIMEOUT), "{out:#?}");
    assert_eq!(
        out.status,
        debug_exit_status(EXIT_BLK_TIMEOUT as i32),
        "{out:#?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // The guest waited about 2 s in HLT: QEMU (start-up, the reset that
    // drains the slow request, everything) used well under a second of
    // CPU. A guest spinning on the used ring would use the whole 2 s.
    assert!(out.cpu_ticks < 80, "{} ticks: {out:#?}", out.cpu_ticks);
}

#[test]
fn legacy_transport_is_reported_and_not_driven() {
    let image = Image::zeroed("legacy", 1);
    let args = [
        "-drive".to_string(),
        format!("{},if=none,id=d0", raw(&image)),
        "-device".to_string(),
        "virtio-blk-device,drive=d0".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = boot(Boot {
        machine: "microvm,acpi=off",
        cmdline: "blk=id",
        extra_args: &args,
        ..Boot::default()
    });
    assert!(
        has_line(
            &out,
            "virtio: 0xfeb00e00 gsi 12 device 2 version 1 vendor 0x554d4551"
        ),
        "{out:#?}"
    );
    assert!(
        has_line(&out, "blk: no usable virtio-blk device"),
        "{out:#?}"
    );
    assert_eq!(
        out.status,
        debug_exit_status(EXIT_BLK_NO_DEVICE as i32),
        "{out:#?}"
    );
}

#[test]
fn declared_address_without_a_device_is_reported_and_blk_words_exit_10() {
    let out = boot(Boot {
        cmdline: "virtio_mmio.device=4K@0xd0000000:16 blk=id exit=3",
        ..Boot::default()
    });
    // QEMU reads unassigned memory as 0.
    assert!(
        has_line(
            &out,
            "virtio: 0xd0000000 gsi 16 no device (magic 0x00000000)"
        ),
        "{out:#?}"
    );
    assert!(
        has_line(&out, "blk: no usable virtio-blk device"),
        "{out:#?}"
    );
    assert_eq!(out.report().exit, Some(EXIT_BLK_NO_DEVICE), "{out:#?}");
}

#[test]
fn bench_words_report_their_ops_and_a_time() {
    let image = Image::zeroed("bench", 8);
    let out = boot_blk(
        "microvm,acpi=off",
        "blk=bench:randread:300 blk=bench:randwrite:300 blk=bench:seqread:40",
        &raw(&image),
        "",
    );
    let benches = out.report().blk_benches;
    let got: Vec<(&str, u64)> = benches.iter().map(|b| (b.kind.as_str(), b.ops)).collect();
    assert_eq!(
        got,
        [("randread", 300), ("randwrite", 300), ("seqread", 40)],
        "{out:#?}"
    );
    assert!(benches.iter().all(|b| b.us > 0), "{benches:?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn use_word_switches_between_two_disks() {
    let (a, b) = (Image::zeroed("two-a", 1), Image::zeroed("two-b", 1));
    let args = [
        "-global".to_string(),
        "virtio-mmio.force-legacy=false".to_string(),
        "-drive".to_string(),
        format!("{},if=none,id=d0", raw(&a)),
        "-device".to_string(),
        "virtio-blk-device,drive=d0,serial=disk-a".to_string(),
        "-drive".to_string(),
        format!("{},if=none,id=d1", raw(&b)),
        "-device".to_string(),
        "virtio-blk-device,drive=d1,serial=disk-b".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = boot(Boot {
        machine: "microvm,acpi=off",
        cmdline: "blk=id blk=write:1:1 blk=use:1 blk=id blk=verify:1:1 blk=use:2",
        extra_args: &args,
        ..Boot::default()
    });
    // QEMU declares both (in its own order); device 0 got the write, so
    // device 1 fails to verify it.
    assert_eq!(lines_with(&out, "virtio: ").len(), 2, "{out:#?}");
    let mut ids = lines_with(&out, "blk: id ");
    ids.sort();
    assert_eq!(ids, ["blk: id disk-a", "blk: id disk-b"], "{out:#?}");
    assert_eq!(
        lines_with(&out, "blk: using device 1 at 0x").len(),
        1,
        "{out:#?}"
    );
    assert!(has_line(&out, "blk: verify failed at block 0"), "{out:#?}");
    assert!(has_line(&out, "blk: no virtio-blk device 2"), "{out:#?}");
    // The first failure decides the exit code.
    assert_eq!(out.report().exit, Some(EXIT_BLK_VERIFY), "{out:#?}");
}

/// null-co delays every request by 20 ms and serves them concurrently, so
/// the bench clock and the queue depth can be checked against it: 4
/// requests one at a time take at least 80 ms; 32 requests 16 at a time at
/// least 40 ms and far less than 32 x 20 ms; neither more than QEMU ran.
#[test]
fn bench_clock_and_queue_depth_match_a_device_of_known_latency() {
    let started = std::time::Instant::now();
    let out = boot_blk(
        "microvm,acpi=off",
        "blk=bench:randread:4:1 blk=bench:randread:32:16",
        "driver=null-co,size=1M,latency-ns=20000000",
        "",
    );
    let wall_us = started.elapsed().as_micros() as u64;
    let b = out.report().blk_benches;
    assert_eq!(b.len(), 2, "{out:#?}");
    assert!(
        (80_000..wall_us).contains(&b[0].us),
        "{b:?}, wall {wall_us} us"
    );
    assert!(
        (40_000..wall_us).contains(&b[1].us),
        "{b:?}, wall {wall_us} us"
    );
    assert!(b[1].us < 320_000, "16 in flight: {b:?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}
