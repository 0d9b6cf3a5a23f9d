//! virtio-blk benchmark: the same part-vmm and test guest, backed by
//! `part-io blk` and by `qemu-storage-daemon`, side by side in one run.
//!
//! `cargo bench -p part-vmm --bench blk [-- RUNS]` (default 5 alternating
//! runs per backend). The guest drives the I/O itself (16 requests in
//! flight): 4 KiB random reads and writes (IOPS) and 64 KiB sequential reads
//! (MB/s) over a 256 MiB raw image; its LAPIC-timer clock gives the time.
//! Prints medians and part-io/qemu-storage-daemon ratios.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{median, part_io_bin};
use std::time::{Duration, Instant};

const IMAGE: u64 = 256 << 20;
const OPS_4K: u32 = 20_000;
const OPS_64K: u32 = 4_000;

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    PartIo,
    Qsd,
}

fn start(backend: Backend, img: &Path, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut c = match backend {
        Backend::PartIo => {
            let mut c = Command::new(part_io_bin());
            c.arg("blk").arg("--export").arg(format!(
                "socket={},image={}",
                sock.display(),
                img.display()
            ));
            c
        }
        Backend::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f0,filename={},cache.direct=off,aio=threads",
                    img.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
                    sock.display()
                ));
            c
        }
    };
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start backend");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "backend socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Runs the guest once; returns (randread IOPS, randwrite IOPS, seqread MB/s).
fn measure(backend: Backend, img: &Path, sock: &Path) -> [f64; 3] {
    let mut be = start(backend, img, sock);
    let cmdline = format!(
        "blk=bench:randread:{OPS_4K} blk=bench:randwrite:{OPS_4K} blk=bench:seqread:{OPS_64K}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_part-vmm"))
        .arg("--kernel")
        .arg(partvisor_test_guest::guest_elf())
        .args([
            "--memory-mib",
            "64",
            "--cmdline",
            &cmdline,
            "--vhost-user-blk",
        ])
        .arg(sock)
        .env("PARTVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("part-vmm");
    let _ = be.kill();
    let _ = be.wait();
    let serial = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "guest failed:\n{serial}");
    let mut r = [0.0; 3];
    for line in serial.lines().filter_map(|l| l.strip_prefix("blk: bench ")) {
        // "<kind> <ops> ops in <us> us"
        let f: Vec<&str> = line.split_whitespace().collect();
        let (ops, us): (f64, f64) = (f[1].parse().unwrap(), f[4].parse().unwrap());
        match f[0] {
            "randread" => r[0] = ops / us * 1e6,
            "randwrite" => r[1] = ops / us * 1e6,
            "seqread" => r[2] = ops * 65536.0 / us, // bytes/us = MB/s
            _ => {}
        }
    }
    r
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("partvisor-blk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("bench.img");
    // A written (not sparse) image, so reads hit real file blocks.
    std::fs::write(&img, vec![0xa5u8; IMAGE as usize]).unwrap();
    let sock = dir.join("bench.sock");
    let mut results: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs {
        let order = if i % 2 == 0 {
            [Backend::PartIo, Backend::Qsd]
        } else {
            [Backend::Qsd, Backend::PartIo]
        };
        for b in order {
            results[usize::from(b == Backend::Qsd)].push(measure(b, &img, &sock));
        }
    }
    println!(
        "virtio-blk benchmark: {runs} alternating runs per backend, medians; guest-driven, 16 in flight, 256 MiB image"
    );
    println!(
        "{:<28} {:>14} {:>14} {:>8}",
        "metric", "part-io blk", "qsd", "ratio"
    );
    let names = [
        "4 KiB random read (IOPS)",
        "4 KiB random write (IOPS)",
        "64 KiB seq read (MB/s)",
    ];
    for (k, name) in names.iter().enumerate() {
        let p = median(results[0].iter().map(|r| r[k]).collect());
        let q = median(results[1].iter().map(|r| r[k]).collect());
        println!("{name:<28} {p:>14.0} {q:>14.0} {:>7.2}x", p / q);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
