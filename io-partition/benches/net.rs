//! Frames/s and round-trip latency port to port: `part-io net` against a
//! Linux bridge between two taps, side by side in one run.
//!
//! `cargo bench -p part-io --features bench --bench net [-- SECONDS]`
//!
//! part-io: two test-side vhost-user-net frontends (one thread each, as two
//! guests' drivers would be) on one switch. Bridge: the same two "guests"
//! use a tap each (write/read on the tap fd, as a VMM without vhost-net
//! would), enslaved to one kernel bridge. Both senders keep at most 256
//! frames in flight (the receiver's posted buffers), so neither path loses
//! frames; loss is still counted. Frame sizes are Ethernet frames without
//! FCS. The bridge needs root, `/dev/net/tun` and `ip` (iproute2); without
//! them only part-io is measured.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::net::*;

const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const WINDOW: u64 = 256;
const SIZES: [usize; 2] = [64, 1500];
const PINGS: usize = 2000;

struct Throughput {
    fps: f64,
    lost: u64,
}

fn payload(len: usize) -> usize {
    len - 14
}

// ---------------------------------------------------------------- part-io

fn partio_throughput(len: usize, secs: f64) -> Throughput {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, NET_QSIZE);
    let mut b = attach(&p, 1, NET_QSIZE);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if b.recv_timeout(Duration::from_millis(50)).is_some() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            b
        })
    };
    let f = seq_frame(B, A, 0, payload(len));
    let mut sent = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let mut queued = false;
        while sent - received.load(Ordering::Relaxed) < WINDOW && a.queue_tx(&f) {
            sent += 1;
            queued = true;
        }
        if queued {
            a.kick(1);
        } else {
            std::thread::yield_now();
        }
    }
    // Let the last frames land.
    let settle = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _b = rx.join().unwrap();
    let got = received.load(Ordering::Relaxed);
    Throughput {
        fps: got as f64 / elapsed,
        lost: sent - got,
    }
}

fn partio_latency(len: usize) -> Vec<Duration> {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, NET_QSIZE);
    let mut b = attach(&p, 1, NET_QSIZE);
    let ping = seq_frame(B, A, 1, payload(len));
    let pong = seq_frame(A, B, 2, payload(len));
    let mut rtts = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        a.send(&ping);
        b.recv();
        b.send(&pong);
        a.recv();
        rtts.push(t.elapsed());
    }
    rtts
}

// ----------------------------------------------------------------- bridge

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: all-zero is a valid ifreq.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

fn open_tap(name: &str) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF on our fd with a valid ifreq.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut r) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two taps enslaved to one bridge; removed on drop.
struct Bridge {
    br: String,
    taps: [File; 2],
}

impl Bridge {
    fn create() -> Result<Bridge, String> {
        let id = std::process::id() % 100_000;
        let br = format!("pbbr{id}");
        let names = [format!("pbta{id}"), format!("pbtb{id}")];
        let ta = open_tap(&names[0]).map_err(|e| format!("tap: {e}"))?;
        let tb = open_tap(&names[1]).map_err(|e| format!("tap: {e}"))?;
        ip(&[
            "link",
            "add",
            "name",
            &br,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        let bridge = Bridge {
            br: br.clone(),
            taps: [ta, tb],
        };
        for n in [&br, &names[0], &names[1]] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{n}/disable_ipv6"), "1");
        }
        for n in &names {
            ip(&["link", "set", n, "master", &br])?;
            ip(&["link", "set", n, "up"])?;
        }
        ip(&["link", "set", &br, "up"])?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(bridge)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.br]);
    }
}

/// Reads frames of our ethertype from `f` (blocking); others are skipped.
fn read_test_frame(f: &mut File, buf: &mut [u8]) -> usize {
    loop {
        let n = f.read(buf).unwrap();
        if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
            return n;
        }
    }
}

fn bridge_throughput(bridge: &Bridge, len: usize, secs: f64) -> Throughput {
    let mut ta = bridge.taps[0].try_clone().unwrap();
    let mut tb = bridge.taps[1].try_clone().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: tb.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 50) } > 0 {
                    read_test_frame(&mut tb, &mut buf);
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let f = seq_frame(B, A, 0, payload(len));
    let mut sent = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if sent - received.load(Ordering::Relaxed) < WINDOW {
            ta.write_all(&f).unwrap();
            sent += 1;
        } else {
            std::thread::yield_now();
        }
    }
    let settle = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    let got = received.load(Ordering::Relaxed);
    Throughput {
        fps: got as f64 / elapsed,
        lost: sent - got,
    }
}

fn bridge_latency(bridge: &Bridge, len: usize) -> Vec<Duration> {
    let mut ta = bridge.taps[0].try_clone().unwrap();
    let mut tb = bridge.taps[1].try_clone().unwrap();
    let ping = seq_frame(B, A, 1, payload(len));
    let pong = seq_frame(A, B, 2, payload(len));
    let mut buf = vec![0u8; 2048];
    let mut rtts = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        ta.write_all(&ping).unwrap();
        read_test_frame(&mut tb, &mut buf);
        tb.write_all(&pong).unwrap();
        read_test_frame(&mut ta, &mut buf);
        rtts.push(t.elapsed());
    }
    rtts
}

// ------------------------------------------------------------------ main

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    // `cargo bench` passes `--bench`; an optional number is the seconds per
    // throughput run.
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3.0);
    println!("part-io net vs Linux bridge, {secs} s per throughput run, window {WINDOW} frames, {PINGS} round trips");
    println!("load average before: {}", load());
    let bridge = if !std::path::Path::new("/dev/net/tun").exists() {
        Err("/dev/net/tun is missing".to_string())
    } else {
        Bridge::create()
    };
    if let Err(e) = &bridge {
        println!("bridge skipped: {e}");
    }
    println!(
        "{:<28} {:>14} {:>14} {:>8}",
        "metric", "part-io", "bridge", "ratio"
    );
    let row = |name: String, ours: f64, theirs: Option<f64>, unit: &str| match theirs {
        Some(t) => println!(
            "{name:<28} {:>10.1} {unit:<3} {:>10.1} {unit:<3} {:>8.2}",
            ours,
            t,
            ours / t
        ),
        None => println!("{name:<28} {:>10.1} {unit:<3} {:>14} {:>8}", ours, "-", "-"),
    };
    for len in SIZES {
        let ours = partio_throughput(len, secs);
        let theirs = bridge
            .as_ref()
            .ok()
            .map(|b| bridge_throughput(b, len, secs));
        row(
            format!("frames/s {len} B (k)"),
            ours.fps / 1e3,
            theirs.as_ref().map(|t| t.fps / 1e3),
            "k",
        );
        row(
            format!("Mbit/s {len} B"),
            ours.fps * len as f64 * 8.0 / 1e6,
            theirs.as_ref().map(|t| t.fps * len as f64 * 8.0 / 1e6),
            "",
        );
        println!(
            "{:<28} {:>14} {:>14}",
            format!("lost {len} B"),
            ours.lost,
            theirs
                .as_ref()
                .map(|t| t.lost.to_string())
                .unwrap_or("-".into())
        );
    }
    for len in SIZES {
        let mut ours = partio_latency(len);
        let mut theirs = bridge.as_ref().ok().map(|b| bridge_latency(b, len));
        row(
            format!("rtt median {len} B"),
            pct(&mut ours, 0.5),
            theirs.as_mut().map(|t| pct(t, 0.5)),
            "us",
        );
        row(
            format!("rtt p99 {len} B"),
            pct(&mut ours, 0.99),
            theirs.as_mut().map(|t| pct(t, 0.99)),
            "us",
        );
    }
    println!("load average after: {}", load());
    println!("ratio = part-io / bridge (higher is better for frames/s, lower for rtt)");
}
