//! Guest sockets benchmark: the same part-vmm and test guest, with
//! `part-io vsock` and with rust-vmm's `vhost-device-vsock` as the
//! backend, side by side in one run, alternating.
//!
//! `cargo bench -p part-vmm --bench vsock [-- RUNS]` (default 3 runs per
//! backend). Measures, by the guests' LAPIC-timer clock:
//! - guest -> guest stream throughput (CID 3 to CID 4, receiver's figure)
//!   in 64 KiB packets (what Linux sends for 64 KiB writes) and in 4 KiB
//!   packets (one receive buffer each), and 64 B round trips (p50, p99)
//!   against an echo in the other guest; vhost-device-vsock joins the two
//!   as siblings (`groups=`). vhost-device-vsock 0.3.0 copies a sibling's
//!   packet into one receive buffer whatever its size and reports the
//!   packet's full length as used, so a 64 KiB packet to a guest with 4 KiB
//!   buffers (as Linux posts them) arrives cut off: the guest stops with a
//!   device error, and the table says so;
//! - the same pair through `part-io net` with raw 1500 B frames (window
//!   32) and 64 B ping/pong, for reference;
//! - guest -> host process stream through the hybrid Unix socket, and 64 B
//!   round trips against a host echo, through part-io's host socket and
//!   through vhost-device-vsock's `uds-path`.
//!
//! Prints medians and part-io / vhost-device-vsock ratios (throughput: > 1
//! is better; latency and CPU: < 1 is better), with the CPU time each
//! backend process used per GiB streamed and per round trip (from
//! `/proc/PID/stat`), which shows the backend's own cost apart from the
//! guests' (on nested KVM most of a round trip is the guests' exits and
//! interrupt entries, the same whichever backend runs).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{finish, median, part_io_bin};
use partvisor_test_guest::vsock_host;

const STREAM: &str = "256M";
const STREAM_BYTES: f64 = (256u64 << 20) as f64;
const HOST_STREAM: &str = "64M";
const HOST_STREAM_BYTES: u64 = 64 << 20;
const PINGS: u32 = 2000;
const FRAMES: u32 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    PartIo,
    Vdv,
}

/// A backend process for two guests (CID 3 and 4), killed when dropped.
struct Relay {
    child: Child,
    dir: PathBuf,
}

impl Relay {
    /// CPU time the backend process has used so far (user + system), in
    /// seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 (1-based), 11 and 12 here.
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks / hz
    }

    fn socket(&self, cid: u32) -> PathBuf {
        self.dir.join(format!("v{cid}.sock"))
    }

    fn host_socket(&self, cid: u32) -> PathBuf {
        self.dir.join(format!("h{cid}.sock"))
    }

    fn start(backend: Backend, dir: &Path) -> Relay {
        let sock = |cid: u32| dir.join(format!("v{cid}.sock"));
        let host = |cid: u32| dir.join(format!("h{cid}.sock"));
        let mut c = match backend {
            Backend::PartIo => {
                let mut c = Command::new(part_io_bin());
                c.arg("vsock");
                for (cid, accept) in [(3, ""), (4, "3:5000+3:5001")] {
                    c.arg("--port").arg(format!(
                        "socket={},cid={cid},uds={},accept={accept}",
                        sock(cid).display(),
                        host(cid).display()
                    ));
                }
                c
            }
            Backend::Vdv => {
                let mut c = Command::new("vhost-device-vsock");
                for cid in [3, 4] {
                    c.arg("--vm").arg(format!(
                        "guest-cid={cid},socket={},uds-path={},groups=bench",
                        sock(cid).display(),
                        host(cid).display()
                    ));
                }
                c
            }
        };
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env("PARTVISOR_LOG", "warn")
            .spawn()
            .expect("start the vsock backend (vhost-device-vsock: resources/setup.sh)");
        let t = Instant::now();
        while !(sock(3).exists() && sock(4).exists()) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "backend sockets never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Relay {
            child,
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// part-vmm with the test guest on `socket` as CID `cid`.
fn guest(cmdline: &str, extra: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_part-vmm"))
        .arg("--kernel")
        .arg(partvisor_test_guest::guest_elf())
        .args(["--memory-mib", "64", "--cmdline", cmdline])
        .args(extra)
        .env("PARTVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start part-vmm")
}

fn vsock_guest(relay: &Relay, cid: u32, cmdline: &str) -> Child {
    guest(
        cmdline,
        &[
            "--vhost-user-vsock".into(),
            relay.socket(cid).display().to_string(),
            "--vsock-cid".into(),
            cid.to_string(),
        ],
    )
}

/// The number before ` us` on the line starting with `prefix`.
fn micros(serial: &str, prefix: &str) -> f64 {
    let line = serial
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{serial}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let at = f
        .iter()
        .position(|w| *w == "us")
        .expect("`N us` in the line");
    f[at - 1].parse().unwrap()
}

/// (p50, p99) in microseconds from a `vsock=ping` line.
fn rtt(serial: &str) -> (f64, f64) {
    let line = serial
        .lines()
        .find(|l| l.contains(" round trips of "))
        .unwrap_or_else(|| panic!("no round trips in:\n{serial}"));
    let ns = |key: &str| -> f64 {
        let v = line
            .split(key)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        v.parse::<f64>().unwrap() / 1000.0
    };
    (ns("p50="), ns("p99="))
}

/// Waits for the listener guest to be ready, then runs the client guest;
/// returns both serials.
fn guest_pair(relay: &Relay, listener: &str, client: &str) -> (String, String) {
    let l = vsock_guest(relay, 4, listener);
    // The listener needs to be up: its device is set up at its first word.
    std::thread::sleep(Duration::from_millis(300));
    let c = vsock_guest(relay, 3, client);
    let sc = finish(c);
    let sl = finish(l);
    (sl, sc)
}

/// A host echo at `path`: sends back every byte of one connection.
fn host_echo(path: PathBuf) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Guest -> guest stream in packets of `packet` bytes: (MB/s, backend CPU
/// ms per GiB), or NaN if the receiver did not get the stream intact (its
/// last line is printed).
fn stream(backend: Backend, dir: &Path, packet: u32) -> (f64, f64) {
    let relay = Relay::start(backend, dir);
    let (sl, _) = guest_pair(
        &relay,
        &format!("vsock=listen:5000:{STREAM}"),
        &format!("vsock=send:4:5000:{STREAM}:0:{packet}"),
    );
    let cpu = relay.cpu_seconds() * 1000.0 * f64::from(1u32 << 30) / STREAM_BYTES;
    if !sl.contains("vsock: received ") {
        let why = sl
            .lines()
            .rfind(|l| l.starts_with("vsock: "))
            .unwrap_or("no vsock line");
        eprintln!(
            "{} stream in {packet} B packets failed: {why}",
            name(backend)
        );
        return (f64::NAN, f64::NAN);
    }
    (STREAM_BYTES / micros(&sl, "vsock: received "), cpu)
}

fn name(b: Backend) -> &'static str {
    match b {
        Backend::PartIo => "part-io",
        Backend::Vdv => "vhost-device-vsock",
    }
}

/// What one run of a backend measured, in [`METRICS`] order.
type Figures = [f64; 9];

/// Name of each figure, and whether more is better.
const METRICS: [(&str, bool); 9] = [
    ("guest->guest 64 KiB packets (MB/s)", true),
    ("guest->guest 4 KiB packets (MB/s)", true),
    ("  backend CPU per GiB (ms)", false),
    ("guest<->guest 64 B p50 (us)", false),
    ("guest<->guest 64 B p99 (us)", false),
    ("  backend CPU per round trip (us)", false),
    ("guest->host stream (MB/s)", true),
    ("guest<->host 64 B p50 (us)", false),
    ("guest<->host 64 B p99 (us)", false),
];

fn measure(backend: Backend, dir: &Path) -> Figures {
    let mut r = [0.0; 9];
    r[0] = stream(backend, dir, 65536).0;
    (r[1], r[2]) = stream(backend, dir, 4052);
    {
        let relay = Relay::start(backend, dir);
        let (_, sc) = guest_pair(
            &relay,
            "vsock=echo:5001",
            &format!("vsock=ping:4:5001:{PINGS}:64"),
        );
        (r[3], r[4]) = rtt(&sc);
        r[5] = relay.cpu_seconds() * 1e6 / f64::from(PINGS);
    }
    {
        let relay = Relay::start(backend, dir);
        let mut p = relay.host_socket(3).into_os_string();
        p.push("_6000");
        let l = UnixListener::bind(PathBuf::from(p)).unwrap();
        let host = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            vsock_host::exchange(s, 0, HOST_STREAM_BYTES, Duration::from_secs(120)).unwrap()
        });
        let s = finish(vsock_guest(
            &relay,
            3,
            &format!("vsock=send:2:6000:{HOST_STREAM}"),
        ));
        let ex = host.join().unwrap();
        assert_eq!(ex.received_bytes, HOST_STREAM_BYTES);
        r[6] = HOST_STREAM_BYTES as f64 / micros(&s, "vsock: sent ");
    }
    {
        let relay = Relay::start(backend, dir);
        let mut p = relay.host_socket(3).into_os_string();
        p.push("_6001");
        let echo = host_echo(PathBuf::from(p));
        let s = finish(vsock_guest(
            &relay,
            3,
            &format!("vsock=ping:2:6001:{PINGS}:64"),
        ));
        (r[7], r[8]) = rtt(&s);
        let _ = echo.join();
    }
    r
}

/// The net switch reference: [1500 B frames as MB/s, 64 B RTT us].
fn measure_net(dir: &Path) -> [f64; 2] {
    const MAC_A: &str = "52:54:00:00:00:0a";
    const MAC_B: &str = "52:54:00:00:00:0b";
    let run = |cmd_a: String, cmd_b: String| -> String {
        let sock = |mac: &str| dir.join(format!("n{}.sock", &mac[15..]));
        let mut c = Command::new(part_io_bin());
        c.arg("net");
        for mac in [MAC_A, MAC_B] {
            c.arg("--port")
                .arg(format!("socket={},mac={mac}", sock(mac).display()));
        }
        let mut switch = c.stderr(Stdio::null()).spawn().expect("part-io net");
        let t = Instant::now();
        while !(sock(MAC_A).exists() && sock(MAC_B).exists()) {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        let nic = |mac: &str| {
            vec![
                "--vhost-user-net".to_string(),
                sock(mac).display().to_string(),
            ]
        };
        let b = guest(&cmd_b, &nic(MAC_B));
        std::thread::sleep(Duration::from_millis(200));
        let a = guest(&cmd_a, &nic(MAC_A));
        let sa = finish(a);
        let _ = finish(b);
        let _ = switch.kill();
        let _ = switch.wait();
        sa
    };
    let s = run(
        format!("net=send:{MAC_B}:{FRAMES}:1500"),
        format!("net=recv:{FRAMES}"),
    );
    let mbs = f64::from(FRAMES) * 1500.0 / micros(&s, "net: send ");
    let s = run(
        format!("net=ping:{MAC_B}:{PINGS}"),
        format!("net=pong:{PINGS}"),
    );
    let rtt = micros(&s, "net: rtt ") / f64::from(PINGS);
    [mbs, rtt]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("partvisor-vsock-bench-{}", std::process::id()));
    let mut res: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    let mut net = Vec::new();
    for i in 0..runs {
        let order = if i % 2 == 0 {
            [Backend::PartIo, Backend::Vdv]
        } else {
            [Backend::Vdv, Backend::PartIo]
        };
        for b in order {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            res[usize::from(b == Backend::Vdv)].push(measure(b, &dir));
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        net.push(measure_net(&dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "guest sockets: {runs} alternating runs, medians; streams of {STREAM} (guest to guest) and {HOST_STREAM} (guest to host), {PINGS} round trips of 64 B"
    );
    println!(
        "{:<34} {:>12} {:>20} {:>8}",
        "metric", "part-io", "vhost-device-vsock", "ratio"
    );
    for (k, (name, more_is_better)) in METRICS.iter().enumerate() {
        let p = median(res[0].iter().map(|r| r[k]).collect());
        let v = median(res[1].iter().map(|r| r[k]).collect());
        if v.is_nan() {
            println!("{name:<34} {p:>12.1} {:>20} {:>8}", "fails", "-");
        } else {
            let better = (p > v) == *more_is_better;
            let mark = if better { "part-io better" } else { "" };
            println!("{name:<34} {p:>12.1} {v:>20.1} {:>7.2}x  {mark}", p / v);
        }
    }
    let stream = median(res[0].iter().map(|r| r[0]).collect());
    let p50 = median(res[0].iter().map(|r| r[3]).collect());
    let net_mbs = median(net.iter().map(|r| r[0]).collect());
    let net_rtt = median(net.iter().map(|r| r[1]).collect());
    println!(
        "reference, part-io net switch, raw frames: 1500 B stream {net_mbs:.1} MB/s (part-io vsock {:.2}x), 64 B round trip {net_rtt:.1} us (part-io vsock p50 {:.2}x)",
        stream / net_mbs,
        p50 / net_rtt
    );
}
