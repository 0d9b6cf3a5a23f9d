//! Boots the built test guest in QEMU microvm (KVM) and checks its report.
//!
//! Needs `qemu-system-x86_64` (Debian: qemu-system-x86) and /dev/kvm. One
//! QEMU at a time (the machine has 2 cores). Each boot is bounded by
//! `PARTVISOR_GUEST_TEST_TIMEOUT_SECS` (default 60); QEMU is killed on timeout.
//! `PARTVISOR_QEMU_CPU` overrides the `-cpu` model (default
//! `host,-arch-capabilities`: on the project's nested-KVM machines plain
//! `-cpu host` aborts QEMU 7.2 with "failed to set MSR 0x10a").

use partvisor_test_guest::report::{Initrd, Probe, Report};
use partvisor_test_guest::{fnv1a64, guest_elf, probe_low_address, PROBE_WRITE_VALUE};
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
const KVM_EXIT_SHUTDOWN: u32 = 8;
const KVM_EXIT_INTERNAL_ERROR: u32 = 17;

struct Boot<'a> {
    cmdline: &'a str,
    vcpus: u32,
    memory_mib: u32,
    initrd: Option<PathBuf>,
    stdin: Option<&'a [u8]>,
    extra_args: &'a [&'a str],
}

impl Default for Boot<'_> {
    fn default() -> Self {
        Boot {
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
struct Outcome {
    /// QEMU's exit status (None if killed on timeout).
    status: Option<i32>,
    serial: String,
    stderr: String,
    /// KVM exit reasons other than I/O and MMIO, per `kvm_run_exit` trace.
    special_exits: Vec<u32>,
    timed_out: bool,
}

impl Outcome {
    fn report(&self) -> Report {
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

fn boot(b: Boot) -> Outcome {
    let _one = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let id = RUN_ID.fetch_add(1, Ordering::SeqCst);
    let trace =
        std::env::temp_dir().join(format!("partvisor-guest-{}-{id}.trace", std::process::id()));
    let cpu =
        std::env::var("PARTVISOR_QEMU_CPU").unwrap_or_else(|_| "host,-arch-capabilities".into());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", &cpu])
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
    let out = Outcome {
        status,
        serial,
        stderr,
        special_exits,
        timed_out,
    };
    assert!(
        !out.timed_out || b.cmdline.contains("crash=int3"),
        "QEMU timed out: {out:#?}"
    );
    out
}

/// QEMU's isa-debug-exit status for guest code N (a process status is 8 bits).
fn debug_exit_status(code: i32) -> Option<i32> {
    Some(((code << 1) | 1) & 0xff)
}

#[test]
fn no_words_reports_and_exits_zero() {
    let out = boot(Boot::default());
    let r = out.report();
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
    assert!(r.header, "{out:#?}");
    assert_eq!(r.cmdline.as_deref(), Some(""));
    assert_eq!(r.exit, Some(0));
    assert_eq!(r.initrd, Some(Initrd::None));
    assert!(r.unknown_words.is_empty());
}

#[test]
fn cmdline_is_echoed_and_unknown_words_are_warned() {
    let out = boot(Boot {
        cmdline: "hello  virtio_mmio.device=4K@0xd0000000:5 exit=300",
        ..Boot::default()
    });
    let r = out.report();
    assert_eq!(
        r.cmdline.as_deref(),
        Some("hello  virtio_mmio.device=4K@0xd0000000:5 exit=300")
    );
    assert_eq!(
        r.unknown_words,
        vec!["hello", "virtio_mmio.device=4K@0xd0000000:5", "exit=300"]
    );
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn exit_word_becomes_the_exit_status() {
    let out = boot(Boot {
        cmdline: "exit=7",
        ..Boot::default()
    });
    assert_eq!(out.report().exit, Some(7));
    assert_eq!(out.status, debug_exit_status(7), "{out:#?}");
    let out = boot(Boot {
        cmdline: "exit=100",
        ..Boot::default()
    });
    assert_eq!(out.report().exit, Some(100));
    assert_eq!(out.status, Some(201), "{out:#?}");
}

#[test]
fn one_vcpu_is_one_cpu_in_the_madt() {
    let out = boot(Boot::default());
    let r = out.report();
    assert_eq!(r.cpus, Some(1), "{out:#?}");
    assert_eq!(r.online, vec![0]);
}

#[test]
fn two_vcpus_are_found_in_the_madt_and_both_come_online() {
    let out = boot(Boot {
        vcpus: 2,
        ..Boot::default()
    });
    let r = out.report();
    assert_eq!(r.cpus, Some(2), "{out:#?}");
    assert_eq!(r.online, vec![0, 1], "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn memory_map_matches_the_memory_size() {
    for mib in [24u64, 32] {
        let out = boot(Boot {
            memory_mib: mib as u32,
            ..Boot::default()
        });
        let r = out.report();
        assert_eq!(r.ram_end(), Some(mib << 20), "{out:#?}");
        let ram = r.ram_bytes_from_memmap();
        assert_eq!(r.ram_kib, Some(ram / 1024));
        // All of it but what QEMU reserves below 1 MiB (EBDA, BIOS).
        assert!(
            ram <= mib << 20 && ram >= (mib << 20) - (1 << 20),
            "{ram:#x}"
        );
        // RAM entries never overlap.
        let mut ram_entries: Vec<_> = r.memmap.iter().filter(|e| e.kind == 1).collect();
        ram_entries.sort_by_key(|e| e.start);
        assert!(ram_entries.windows(2).all(|w| w[0].end <= w[1].start));
    }
}

#[test]
fn initrd_reaches_the_guest_intact() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let path = std::env::temp_dir().join(format!("partvisor-guest-initrd-{}", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let out = boot(Boot {
        initrd: Some(path.clone()),
        ..Boot::default()
    });
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        out.report().initrd,
        Some(Initrd::Present {
            size: data.len() as u64,
            fnv1a64: fnv1a64(&data)
        }),
        "{out:#?}"
    );
}

#[test]
fn crash_triple_is_a_kvm_shutdown() {
    let out = boot(Boot {
        cmdline: "crash=triple",
        vcpus: 2,
        ..Boot::default()
    });
    assert!(
        out.report()
            .lines
            .iter()
            .any(|l| l == "crash: triple fault"),
        "{out:#?}"
    );
    assert_eq!(out.report().exit, None);
    assert_eq!(out.special_exits, vec![KVM_EXIT_SHUTDOWN], "{out:#?}");
    // -no-reboot turns the guest reset into a normal QEMU exit.
    assert_eq!(out.status, Some(0), "{out:#?}");
}

#[test]
fn crash_int3_is_a_shutdown_or_an_emulation_failure() {
    let out = boot(Boot {
        cmdline: "crash=int3",
        ..Boot::default()
    });
    assert!(
        out.report().lines.iter().any(|l| l == "crash: int3"),
        "{out:#?}"
    );
    assert_eq!(out.report().exit, None);
    let shutdown = out.special_exits == [KVM_EXIT_SHUTDOWN] && out.status == Some(0);
    let emulation_failure = out.special_exits.contains(&KVM_EXIT_INTERNAL_ERROR)
        || out.stderr.contains("KVM internal error");
    assert!(shutdown || emulation_failure, "{out:#?}");
}

#[test]
fn probe_unassigned_reads_qemu_unassigned_value_and_writes_are_dropped() {
    let out = boot(Boot {
        cmdline: "probe=unassigned",
        memory_mib: 24,
        ..Boot::default()
    });
    let low = probe_low_address(24 << 20);
    let high = partvisor_test_guest::PROBE_HIGH_ADDRESS;
    let mut expected = Vec::new();
    for addr in [low, high] {
        // QEMU 7.2 reads unassigned guest-physical memory as 0 (part-vmm:
        // all ones); either way the write must not stick.
        expected.push(Probe::Read { addr, value: 0 });
        expected.push(Probe::Write { addr });
        expected.push(Probe::Read { addr, value: 0 });
    }
    assert_eq!(out.report().probes, expected, "{out:#?}");
    assert!(!out.serial.contains(&format!("{PROBE_WRITE_VALUE:08x}")));
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn serial_input_is_echoed_through_the_uart_interrupt() {
    let out = boot(Boot {
        cmdline: "echo=3",
        stdin: Some(b"aZ\n"),
        ..Boot::default()
    });
    let r = out.report();
    assert!(r.lines.iter().any(|l| l == "echo: ready"), "{out:#?}");
    assert_eq!(r.echoed, b"aZ\n".to_vec(), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn reset_word_resets_through_the_i8042() {
    let out = boot(Boot {
        cmdline: "reset",
        extra_args: &["-device", "i8042"],
        ..Boot::default()
    });
    let r = out.report();
    assert!(r.lines.iter().any(|l| l == "reset: i8042"), "{out:#?}");
    assert!(!r.lines.iter().any(|l| l == "reset: no effect"), "{out:#?}");
    // A reset request, not a triple fault; -no-reboot makes it QEMU's exit.
    assert_eq!(out.special_exits, Vec::<u32>::new(), "{out:#?}");
    assert_eq!(out.status, Some(0), "{out:#?}");
}

#[test]
fn reset_word_without_an_i8042_exits_4_after_a_second() {
    let out = boot(Boot {
        cmdline: "reset",
        ..Boot::default()
    });
    let r = out.report();
    assert!(r.lines.iter().any(|l| l == "reset: no effect"), "{out:#?}");
    assert_eq!(r.exit, Some(partvisor_test_guest::EXIT_RESET_IGNORED));
    assert_eq!(out.status, debug_exit_status(4), "{out:#?}");
}
