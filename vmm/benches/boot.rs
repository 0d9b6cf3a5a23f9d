//! Boot benchmark: part-vmm against QEMU microvm, side by side in one run,
//! booting the same test guest (resources/guests).
//!
//! `cargo bench -p part-vmm --bench boot [-- RUNS]` (default 10 runs each,
//! alternating). For each VMM it measures
//!   (a) process start -> first serial byte,
//!   (b) process start -> guest exit (guest cmdline empty: report, exit 0),
//!   (c) peak RSS (VmHWM) minus the guest's shared memory (RssShmem),
//!   (d) CPU time of the non-vCPU threads,
//! where (c) and (d) are read from /proc while the guest idles after its
//! report (cmdline `stay`). Both VMMs get 128 MiB of memfd-backed guest
//! memory (QEMU through memory-backend-memfd) so RssShmem means the same.
//! Prints medians and part-vmm/QEMU ratios.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEM_MIB: u64 = 128;

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    PartVmm,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::PartVmm => "part-vmm",
            Vmm::Qemu => "qemu",
        }
    }

    fn command(self, guest: &Path, cmdline: &str) -> Command {
        let mut c = match self {
            Vmm::PartVmm => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_part-vmm"));
                c.arg("--kernel")
                    .arg(guest)
                    .arg("--memory-mib")
                    .arg(MEM_MIB.to_string())
                    .arg("--cmdline")
                    .arg(cmdline)
                    .env("PARTVISOR_LOG", "warn");
                c
            }
            Vmm::Qemu => common::qemu_microvm(
                "microvm,memory-backend=mem0",
                MEM_MIB,
                &[
                    "-object".into(),
                    format!("memory-backend-memfd,id=mem0,size={MEM_MIB}M,share=on"),
                ],
                guest,
                cmdline,
            ),
        };
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        c
    }

    fn is_vcpu_thread(self, comm: &str) -> bool {
        match self {
            Vmm::PartVmm => comm.starts_with("vcpu"),
            Vmm::Qemu => comm.starts_with("CPU ") && comm.contains("/KVM"),
        }
    }
}

/// Reads the child's stdout until `needle` shows up; returns the time of the
/// first byte and of the needle, both from `start`.
fn read_until(child: &mut Child, start: Instant, needle: &str) -> (Duration, Duration) {
    let out = child.stdout.as_mut().expect("stdout");
    let mut first = None;
    let mut acc = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = out.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "output ended before {needle:?}: {}",
            String::from_utf8_lossy(&acc)
        );
        first.get_or_insert_with(|| start.elapsed());
        acc.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&acc).contains(needle) {
            return (first.unwrap_or_default(), start.elapsed());
        }
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time of the threads that are not vCPUs, from each thread's
/// `schedstat` (nanoseconds on CPU; clock ticks are too coarse here).
fn non_vcpu_cpu_ms(vmm: Vmm, pid: u32) -> f64 {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = t.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if vmm.is_vcpu_thread(comm.trim()) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e6
}

struct Sample {
    first_byte_ms: f64,
    exit_ms: f64,
    private_peak_kib: u64,
    non_vcpu_cpu_ms: f64,
}

fn measure(vmm: Vmm, guest: &Path) -> Sample {
    // (a), (b): report and exit.
    let start = Instant::now();
    let mut child = vmm.command(guest, "").spawn().expect("spawn");
    let (first, _) = read_until(&mut child, start, "exit:");
    let status = child.wait().expect("wait");
    let exit_ms = start.elapsed().as_secs_f64() * 1e3;
    let ok = match vmm {
        Vmm::PartVmm => status.code() == Some(0),
        Vmm::Qemu => status.code() == Some(1), // (0 << 1) | 1
    };
    assert!(ok, "{} exited with {status}", vmm.name());
    // (c), (d): read /proc while the guest idles after its report.
    let start = Instant::now();
    let mut child = vmm.command(guest, "stay").spawn().expect("spawn");
    read_until(&mut child, start, "stay: idle");
    std::thread::sleep(Duration::from_millis(100));
    let pid = child.id();
    let hwm = status_kib(pid, "VmHWM:");
    let shmem = status_kib(pid, "RssShmem:");
    let cpu = non_vcpu_cpu_ms(vmm, pid);
    let _ = child.kill();
    let _ = child.wait();
    Sample {
        first_byte_ms: first.as_secs_f64() * 1e3,
        exit_ms,
        private_peak_kib: hwm.saturating_sub(shmem),
        non_vcpu_cpu_ms: cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let guest = partvisor_test_guest::guest_elf();
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
        std::process::exit(1);
    }
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs {
        for (k, vmm) in [Vmm::PartVmm, Vmm::Qemu].into_iter().enumerate() {
            // Alternate which VMM goes first.
            let vmm = if i % 2 == 0 {
                vmm
            } else {
                [Vmm::Qemu, Vmm::PartVmm][k]
            };
            let idx = usize::from(vmm == Vmm::Qemu);
            samples[idx].push(measure(vmm, guest));
        }
    }
    let med = |s: &Vec<Sample>, f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
    type Metric = (&'static str, fn(&Sample) -> f64, &'static str);
    let metrics: [Metric; 4] = [
        ("(a) start -> first serial byte", |s| s.first_byte_ms, "ms"),
        ("(b) start -> guest exit", |s| s.exit_ms, "ms"),
        (
            "(c) peak RSS - RssShmem",
            |s| s.private_peak_kib as f64 / 1024.0,
            "MiB",
        ),
        ("(d) non-vCPU thread CPU time", |s| s.non_vcpu_cpu_ms, "ms"),
    ];
    println!(
        "boot benchmark: {runs} alternating runs each, medians (guest {})",
        guest.display()
    );
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "metric", "part-vmm", "qemu", "ratio"
    );
    for (name, f, unit) in metrics {
        let p = med(&samples[0], f);
        let q = med(&samples[1], f);
        let ratio = if q > 0.0 {
            format!("{:.3}x", p / q)
        } else {
            "n/a".into()
        };
        println!(
            "{:<34} {:>9.2} {:<3}{:>9.2} {:<3}{:>9}",
            name, p, unit, q, unit, ratio
        );
    }
}
