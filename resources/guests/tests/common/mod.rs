//! QEMU microvm runner shared by the test binaries.
//!
//! Needs `qemu-system-x86_64` (Debian: qemu-system-x86) and /dev/kvm. One
//! QEMU at a time per test binary (cargo runs the binaries one after
//! another; the machine has 2 cores). Each boot is bounded by
//! `PARTVISOR_GUEST_TEST_TIMEOUT_SECS` (default 60); QEMU is killed on
//! timeout. `PARTVISOR_QEMU_CPU` overrides the `-cpu` model (default
//! `host,-arch-capabilities`: on the project's nested-KVM machines plain
//! `-cpu host` aborts QEMU 7.2 with "failed to set MSR 0x10a").

#![allow(dead_code)] // each test binary uses part of it

use partvisor_runtime::sync::MutexExt;
use partvisor_test_guest::guest_elf;
use partvisor_test_guest::report::Report;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wait_timeout::ChildExt;

/// One QEMU at a time.
static QEMU: Mutex<()> = Mutex::new(());
static RUN_ID: AtomicUsize = AtomicUsize::new(0);

/// KVM exit reasons (linux/kvm.h) as QEMU's `kvm_run_exit` trace prints them.
pub const KVM_EXIT_SHUTDOWN: u32 = 8;
pub const KVM_EXIT_INTERNAL_ERROR: u32 = 17;

/// One QEMU microvm boot of the guest.
pub struct Boot<'a> {
    /// `-M` value.
    pub machine: &'a str,
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub initrd: Option<PathBuf>,
    pub stdin: Option<&'a [u8]>,
    pub extra_args: &'a [&'a str],
}

impl Default for Boot<'_> {
    fn default() -> Self {
        Boot {
            machine: "microvm",
            cmdline: "",
            vcpus: 1,
            memory_mib: 32,
            initrd: None,
            stdin: None,
            extra_args: &[],
        }
    }
}

#[derive(Debug)]
pub struct Outcome {
    /// QEMU's exit status (None if killed on timeout).
    pub status: Option<i32>,
    pub serial: String,
    pub stderr: String,
    /// KVM exit reasons other than I/O and MMIO, per `kvm_run_exit` trace.
    pub special_exits: Vec<u32>,
    pub timed_out: bool,
    /// CPU time QEMU used (user + system, all threads), in clock ticks.
    pub cpu_ticks: u64,
}

/// User + system time of this process's reaped children, in clock ticks
/// (`cutime` + `cstime` of /proc/self/stat).
fn children_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name; cutime and cstime are
    // fields 16 and 17 (1-based), i.e. 13 and 14 after "(comm) ".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f[13] + f[14]
}

impl Outcome {
    pub fn report(&self) -> Report {
        Report::parse(&self.serial)
    }
}

fn timeout() -> Duration {
    let secs = std::env::var("PARTVISOR_GUEST_TEST_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

pub fn boot(b: Boot) -> Outcome {
    let _one = QEMU.locked();
    // Only this QEMU is reaped while the lock is held.
    let ticks_before = children_cpu_ticks();
    let running = start(&b);
    let mut out = running.finish();
    out.cpu_ticks = children_cpu_ticks() - ticks_before;
    assert!(
        !out.timed_out || b.cmdline.contains("crash=int3"),
        "QEMU timed out: {out:#?}"
    );
    out
}

/// Two guests at once (e.g. the two ends of a network link); both must end
/// within the timeout. `cpu_ticks` of each outcome is both QEMUs' total.
pub fn boot_pair(a: Boot, b: Boot) -> (Outcome, Outcome) {
    let _one = QEMU.locked();
    let ticks_before = children_cpu_ticks();
    let ra = start(&a);
    let rb = start(&b);
    let mut oa = ra.finish();
    let mut ob = rb.finish();
    let ticks = children_cpu_ticks() - ticks_before;
    oa.cpu_ticks = ticks;
    ob.cpu_ticks = ticks;
    assert!(
        !oa.timed_out && !ob.timed_out,
        "QEMU timed out: {oa:#?} {ob:#?}"
    );
    (oa, ob)
}

/// A QEMU started by [`start`].
pub struct Running {
    child: std::process::Child,
    trace: PathBuf,
    serial: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
    internal_error: Arc<AtomicBool>,
}

/// Start QEMU for `b` (callers hold [`QEMU`]).
fn start(b: &Boot) -> Running {
    let id = RUN_ID.fetch_add(1, Ordering::SeqCst);
    let trace =
        std::env::temp_dir().join(format!("partvisor-guest-{}-{id}.trace", std::process::id()));
    let cpu =
        std::env::var("PARTVISOR_QEMU_CPU").unwrap_or_else(|_| "host,-arch-capabilities".into());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", b.machine, "-enable-kvm", "-cpu", &cpu])
        .args([
            "-m",
            &b.memory_mib.to_string(),
            "-smp",
            &b.vcpus.to_string(),
        ])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-trace", "kvm_run_exit", "-D"])
        .arg(&trace)
        .arg("-kernel")
        .arg(guest_elf())
        .args(["-append", b.cmdline]);
    cmd.args(b.extra_args);
    if let Some(initrd) = &b.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.stdin(if b.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("qemu-system-x86_64 must be installed (apt-get install qemu-system-x86)");
    if let (Some(bytes), Some(mut stdin)) = (b.stdin, child.stdin.take()) {
        stdin.write_all(bytes).unwrap();
        // Dropping stdin closes it; QEMU keeps running.
    }
    let serial = read_all(child.stdout.take().unwrap());
    // stderr: watch for an emulation failure (QEMU then pauses, never exits).
    let internal_error = Arc::new(AtomicBool::new(false));
    let stderr = {
        let flag = internal_error.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&all).contains("KVM internal error") {
                    flag.store(true, Ordering::SeqCst);
                }
            }
            String::from_utf8_lossy(&all).into_owned()
        })
    };
    Running {
        child,
        trace,
        serial,
        stderr,
        internal_error,
    }
}

impl Running {
    /// Wait for QEMU to end (killed after the timeout or an emulation
    /// failure) and collect what it printed. `cpu_ticks` is left 0.
    fn finish(self) -> Outcome {
        let Running {
            mut child,
            trace,
            serial,
            stderr,
            internal_error,
        } = self;
        let deadline = Instant::now() + timeout();
        let mut status = None;
        let mut timed_out = false;
        loop {
            if let Some(s) = child.wait_timeout(Duration::from_millis(50)).unwrap() {
                status = s.code();
                break;
            }
            if internal_error.load(Ordering::SeqCst) {
                // Give QEMU a moment to finish its register dump.
                std::thread::sleep(Duration::from_millis(200));
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
        let serial = serial.join().unwrap();
        let stderr = stderr.join().unwrap();
        let special_exits = std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit_once("reason ")?.1.trim().parse::<u32>().ok())
            .filter(|&r| r != 2 && r != 6) // KVM_EXIT_IO, KVM_EXIT_MMIO
            .collect();
        let _ = std::fs::remove_file(&trace);
        Outcome {
            status,
            serial,
            stderr,
            special_exits,
            timed_out,
            cpu_ticks: 0,
        }
    }
}

/// QEMU's isa-debug-exit status for guest code N (a process status is 8 bits).
pub fn debug_exit_status(code: i32) -> Option<i32> {
    Some(((code << 1) | 1) & 0xff)
}
