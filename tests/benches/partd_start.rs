//! partd start benchmark (issue 5):
//!
//! 1. `partctl start` → monitor running, one at a time: wall time of the
//!    partctl process, partd's own breakdown (`start_timings`) and the
//!    coordinator's share = wall − the monitor's own time until its first
//!    answer. Side by side: the same monitor started directly (spawn
//!    part-vmm, poll its control socket until it answers), i.e. no
//!    coordinator at all.
//! 2. Partitions started per second with 20 `partctl start` in flight.
//!
//! `cargo bench -p partvisor-e2e --features bench` (env `BENCH_ROUNDS`,
//! default 20 sequential starts and 3 rounds of 20 in flight).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use partvisor_e2e::{bins, guest, kill, wait_gone, Partd};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(us: &serde_json::Value) -> f64 {
    us.as_u64().unwrap_or(0) as f64 / 1000.0
}

/// One result row: label, then median / p90 in ms, then `suffix`.
fn row(label: &str, v: &mut [f64], suffix: &str) {
    println!("{label}{:8.2} / {:8.2}{suffix}", median(v), pct(v, 0.9));
}

/// Runs `partctl <args> f<i>` for partitions `f0..f<n>` all at once and
/// returns each process's output, in order.
fn partctl_in_flight(
    socket: &std::path::Path,
    n: usize,
    args: &[&str],
) -> Vec<std::process::Output> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let socket = socket.to_path_buf();
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            args.push(format!("f{i}"));
            std::thread::spawn(move || {
                Command::new(&bins().partctl)
                    .arg("--socket")
                    .arg(socket)
                    .args(args)
                    .output()
                    .expect("partctl")
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// part-vmm started directly, until its control socket answers a ping.
fn direct_start(dir: &std::path::Path, i: usize) -> f64 {
    let control = dir.join(format!("direct-{i}.sock"));
    let t0 = Instant::now();
    let mut child = Command::new(&bins().part_vmm)
        .arg("--kernel")
        .arg(guest())
        .args([
            "--memory-mib",
            "32",
            "--vcpus",
            "1",
            "--cmdline",
            "stay",
            "--serial",
            "none",
        ])
        .arg("--control-socket")
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn part-vmm");
    let took = loop {
        if let Ok(mut s) = UnixStream::connect(&control) {
            s.write_all(b"{\"op\":\"ping\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            if line.contains("\"ok\":true") {
                break t0.elapsed();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "direct part-vmm never answered"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    kill(child.id(), libc::SIGKILL);
    let _ = child.wait();
    let _ = std::fs::remove_file(&control);
    took.as_secs_f64() * 1000.0
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());
    let partd = Partd::start(&["--memory-budget-mib", "4096"]);

    // 1. One at a time.
    partd.create("seq", "memory_mib = 32");
    let (mut wall, mut share, mut inside, mut monitor, mut grant, mut running, mut direct) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut spawn = vec![];
    for i in 0..rounds {
        let t0 = Instant::now();
        let v = partd.ctl_json(&["start", "seq"]);
        let w = t0.elapsed().as_secs_f64() * 1000.0;
        let t = &v["start_timings"];
        assert_eq!(v["state"], "running");
        wall.push(w);
        monitor.push(ms(&t["monitor_us"]));
        share.push(w - ms(&t["monitor_us"]));
        inside.push(ms(&t["total_us"]) - ms(&t["monitor_us"]));
        grant.push(ms(&t["grant_us"]));
        spawn.push(ms(&t["spawn_us"]));
        running.push(ms(&t["running_us"]));
        let pid = v["vmm"]["pid"].as_u64().unwrap() as u32;
        partd.ctl_json(&["stop", "seq", "--force"]);
        wait_gone(pid, Duration::from_secs(10));
        direct.push(direct_start(partd.path(), i));
    }
    println!(
        "\n== partctl start -> monitor answering, one at a time ({rounds} runs, ms: median / p90)"
    );
    row("partctl start wall            ", &mut wall, "");
    row("  monitor's own share         ", &mut monitor, "");
    row(
        "  coordinator share (wall - monitor) ",
        &mut share,
        "   target <= 20 ms",
    );
    row("    of which inside partd      ", &mut inside, "");
    row("      grant transaction         ", &mut grant, "");
    row("      descriptor + fork/exec    ", &mut spawn, "");
    row("      record running + reply    ", &mut running, "");
    row("direct part-vmm (no partd)    ", &mut direct, "");
    println!(
        "ratio partctl start / direct  {:8.2}",
        median(&mut wall) / median(&mut direct)
    );

    // 2. 20 in flight.
    let n = 20;
    for i in 0..n {
        partd.create(&format!("f{i}"), "memory_mib = 16\ncpu_share = 0.05");
    }
    let mut rates = vec![];
    for _round in 0..3 {
        let t0 = Instant::now();
        for out in partctl_in_flight(&partd.socket, n, &["start"]) {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let secs = t0.elapsed().as_secs_f64();
        rates.push(n as f64 / secs);
        for out in partctl_in_flight(&partd.socket, n, &["stop", "--force"]) {
            assert!(out.status.success());
        }
    }
    println!("\n== {n} partctl start in flight (3 rounds)");
    for r in &rates {
        println!("partitions started per second  {r:8.1}");
    }
    println!("median                         {:8.1}", median(&mut rates));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at end: {}", load.trim());
}
