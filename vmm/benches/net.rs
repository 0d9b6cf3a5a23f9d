//! Guest-to-guest network benchmark: two test guests in part-vmm joined by a
//! `part-io net` switch, against two QEMU microvm guests joined by QEMU's
//! UDP socket netdev on loopback (QEMU's own guest-to-guest link), side by
//! side in one run.
//!
//! `cargo bench -p part-vmm --bench net [-- RUNS]` (default 3 alternating
//! runs). Measures frames/s of a flow-controlled one-way stream (window 32,
//! acknowledged by the receiver) at 64 B and 1500 B, and the round-trip time
//! of 64 B ping/pong, all timed by the guests' LAPIC-timer clock. Prints
//! medians and part-io/QEMU ratios.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{finish, median, part_io_bin};
use std::time::{Duration, Instant};

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";
const FRAMES: u32 = 20_000;
const PINGS: u32 = 2_000;

#[derive(Clone, Copy, PartialEq)]
enum Link {
    PartIo,
    QemuUdp,
}

/// Starts guest `mac` with `cmdline` on `link`; returns its process.
fn guest(link: Link, dir: &Path, mac: &str, peer_port: (u16, u16), cmdline: &str) -> Child {
    let elf = partvisor_test_guest::guest_elf();
    let mut c = match link {
        Link::PartIo => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_part-vmm"));
            c.arg("--kernel")
                .arg(elf)
                .args([
                    "--memory-mib",
                    "64",
                    "--cmdline",
                    cmdline,
                    "--vhost-user-net",
                ])
                .arg(dir.join(format!("{}.sock", &mac[15..])))
                .env("PARTVISOR_LOG", "warn");
            c
        }
        Link::QemuUdp => {
            let (local, remote) = peer_port;
            common::qemu_microvm(
                "microvm,acpi=off",
                64,
                &[
                    "-global".into(),
                    "virtio-mmio.force-legacy=false".into(),
                    "-netdev".into(),
                    format!("socket,id=n0,udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}"),
                    "-device".into(),
                    format!("virtio-net-device,netdev=n0,mac={mac}"),
                ],
                elf,
                cmdline,
            )
        }
    };
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start guest")
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Value of `<prefix> ... in <us> us` lines: (count, microseconds).
fn timed(serial: &str, prefix: &str) -> (f64, f64) {
    let line = serial
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{serial}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let us: f64 = f[f.len() - 2].parse().unwrap();
    let n: f64 = f[2].parse().unwrap();
    (n, us)
}

/// One pair run: receiver `cmd_b`, sender `cmd_a`; returns A's serial.
fn pair(link: Link, cmd_a: &str, cmd_b: &str) -> String {
    let dir = std::env::temp_dir().join(format!("partvisor-net-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut switch = None;
    if link == Link::PartIo {
        let mut c = Command::new(part_io_bin());
        c.arg("net");
        for mac in [MAC_A, MAC_B] {
            c.arg("--port").arg(format!(
                "socket={}/{}.sock,mac={mac}",
                dir.display(),
                &mac[15..]
            ));
        }
        switch = Some(c.stderr(Stdio::null()).spawn().expect("part-io net"));
        let t = Instant::now();
        while !dir.join("0b.sock").exists() || !dir.join("0a.sock").exists() {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (pa, pb) = (free_port(), free_port());
    let b = guest(link, &dir, MAC_B, (pb, pa), cmd_b);
    std::thread::sleep(Duration::from_millis(200));
    let a = guest(link, &dir, MAC_A, (pa, pb), cmd_a);
    let sa = finish(a);
    let sb = finish(b);
    assert!(
        sb.contains("net: received") || sb.contains("net: pong") || sb.contains("exit: 0"),
        "{sb}"
    );
    if let Some(mut s) = switch {
        let _ = s.kill();
        let _ = s.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    sa
}

fn measure(link: Link) -> [f64; 3] {
    let mut r = [0.0; 3];
    for (k, size) in [64u32, 1500].iter().enumerate() {
        let s = pair(
            link,
            &format!("net=send:{MAC_B}:{FRAMES}:{size}"),
            &format!("net=recv:{FRAMES}"),
        );
        let (n, us) = timed(&s, "net: send ");
        r[k] = n / us * 1e6;
    }
    let s = pair(
        link,
        &format!("net=ping:{MAC_B}:{PINGS}"),
        &format!("net=pong:{PINGS}"),
    );
    let (n, us) = timed(&s, "net: rtt ");
    r[2] = us / n;
    r
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let mut res: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs {
        let order = if i % 2 == 0 {
            [Link::PartIo, Link::QemuUdp]
        } else {
            [Link::QemuUdp, Link::PartIo]
        };
        for l in order {
            res[usize::from(l == Link::QemuUdp)].push(measure(l));
        }
    }
    println!("guest-to-guest network: {runs} alternating runs, medians; {FRAMES} frames (window 32), {PINGS} pings");
    println!(
        "{:<26} {:>14} {:>16} {:>8}",
        "metric", "part-io net", "qemu udp link", "ratio"
    );
    let names = ["64 B frames/s", "1500 B frames/s", "64 B round trip (us)"];
    for (k, name) in names.iter().enumerate() {
        let p = median(res[0].iter().map(|r| r[k]).collect());
        let q = median(res[1].iter().map(|r| r[k]).collect());
        println!("{name:<26} {p:>14.1} {q:>16.1} {:>7.2}x", p / q);
    }
}
