//! part-vmm booting the project's test guest (resources/guests): report,
//! exits, SMP, memory map, serial in/out, polite stop, unassigned accesses.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use partvisor_test_guest::blk_pattern::fnv1a64;

#[test]
fn guest_reports_and_part_vmm_exits_with_its_code() {
    let _l = vm_lock();
    let r = run_guest("", &[]);
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert_eq!(r.lines("partvisor-testguest 1").len(), 1);
    assert_eq!(r.value("cmdline:"), "");
    assert_eq!(r.value("cpus:"), "1 (madt)");
    assert_eq!(r.lines("cpu 0: online").len(), 1);
    assert_eq!(r.value("initrd:"), "none");
    assert_eq!(r.value("exit:"), "0");
    assert!(
        r.exit_line().contains("reason=guest-exit status=0 code=0"),
        "{}",
        r.exit_line()
    );
}

#[test]
fn exit_word_sets_the_status_and_the_cmdline_is_reported() {
    let _l = vm_lock();
    let r = run_guest("exit=7 label=seven", &[]);
    assert_eq!(r.code(), 7, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert_eq!(r.value("cmdline:"), "exit=7 label=seven");
    assert_eq!(r.value("exit:"), "7");
    assert!(r.exit_line().contains("reason=guest-exit status=7 code=7"));
}

#[test]
fn two_vcpus_are_found_in_the_madt_and_both_report_in() {
    let _l = vm_lock();
    let r = run_guest("", &["--vcpus", "2"]);
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert_eq!(r.value("cpus:"), "2 (madt)");
    assert_eq!(r.lines("cpu 0: online").len(), 1, "{}", r.serial);
    assert_eq!(r.lines("cpu 1: online").len(), 1, "{}", r.serial);
}

#[test]
fn reported_memory_map_matches_24_mib() {
    let _l = vm_lock();
    let r = run_guest("", &["--memory-mib", "24"]);
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    let expected: Vec<String> = part_vmm::boot::memory_map(24 << 20)
        .iter()
        .map(|(start, size, kind)| format!("memmap: {kind} {start:#018x} {:#018x}", start + size))
        .collect();
    let got: Vec<&str> = r.lines("memmap:");
    assert_eq!(got, expected);
    let ram_kib: u64 = part_vmm::boot::memory_map(24 << 20)
        .iter()
        .filter(|e| e.2 == 1)
        .map(|e| e.1 / 1024)
        .sum();
    assert_eq!(r.value("ram:"), format!("{ram_kib} KiB"));
}

#[test]
fn triple_fault_ends_with_its_own_status() {
    let _l = vm_lock();
    let r = run_guest("crash=triple", &[]);
    assert_eq!(r.code(), 72, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert!(
        r.exit_line().contains("reason=triple-fault"),
        "{}",
        r.exit_line()
    );
}

#[test]
fn int3_with_no_idt_vector_ends_as_emulation_failure_or_triple_fault() {
    let _l = vm_lock();
    let r = run_guest("crash=int3", &[]);
    let line = r.exit_line();
    match r.code() {
        73 => {
            assert!(line.contains("reason=internal-error"), "{line}");
            // The registers are logged with the failure.
            assert!(line.contains("rip=0x") && line.contains("cr0=0x"), "{line}");
        }
        72 => assert!(line.contains("reason=triple-fault"), "{line}"),
        other => panic!("status {other}: {line}\nserial:\n{}", r.serial),
    }
}

#[test]
fn unassigned_accesses_read_all_ones_and_are_counted() {
    let _l = vm_lock();
    let r = run_guest("probe=unassigned", &["--memory-mib", "32"]);
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    let reads = r.lines("probe: read");
    assert!(reads.len() >= 2, "{}", r.serial);
    for l in &reads {
        assert!(l.ends_with("= 0xffffffff"), "{l}");
    }
    assert!(!r.lines("probe: write").is_empty());
    let summary = r
        .log
        .lines()
        .find(|l| l.contains("unassigned accesses:"))
        .expect("summary line");
    let count = |key: &str| -> u64 {
        let v = summary.split(key).nth(1).unwrap();
        v.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(count("mmio_reads=") >= reads.len() as u64, "{summary}");
    assert!(count("mmio_writes=") >= 1, "{summary}");
    assert!(r.log.contains("unassigned mmio read at"), "{}", r.log);
}

#[test]
fn config_file_runs_the_same_as_flags() {
    let _l = vm_lock();
    let dir = scratch("config");
    let g = guest();
    let cfg = serde_json::json!({
        "vcpus": 2,
        "memory_mib": 40,
        "kernel": g,
        "cmdline": "exit=5 via=config",
        "serial": "stdout",
        "devices": []
    });
    let path = write_file(&dir, "p.json", cfg.to_string().as_bytes());
    let from_file = run(&["--config", path.to_str().unwrap()]);
    let from_flags = run_guest("exit=5 via=config", &["--vcpus", "2", "--memory-mib", "40"]);
    assert_eq!(
        from_file.code(),
        5,
        "{}\n{}",
        from_file.serial,
        from_file.log
    );
    assert_eq!(from_flags.code(), 5);
    assert_eq!(from_file.lines("cpus:"), from_flags.lines("cpus:"));
    assert_eq!(from_file.lines("memmap:"), from_flags.lines("memmap:"));
    assert_eq!(from_file.lines("cmdline:"), from_flags.lines("cmdline:"));
    assert_eq!(from_file.lines("ram:"), from_flags.lines("ram:"));
}

#[test]
fn initrd_reaches_the_guest_intact() {
    let _l = vm_lock();
    let dir = scratch("initrd");
    let data: Vec<u8> = (0..100_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let p = write_file(&dir, "initrd.img", &data);
    let r = run_guest("", &["--initrd", p.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert_eq!(
        r.value("initrd:"),
        format!("{} bytes fnv1a64={:016x}", data.len(), fnv1a64(&data))
    );
}

#[test]
fn serial_input_from_stdin_reaches_the_guest() {
    let _l = vm_lock();
    let g = guest();
    let mut child = command(&["--kernel", g.to_str().unwrap(), "--cmdline", "echo=3"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut acc = String::new();
    read_until(&mut out, &mut acc, "echo: ready");
    stdin.write_all(b"pV\n").unwrap();
    stdin.flush().unwrap();
    read_until(&mut out, &mut acc, "exit:");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{acc}");
    let echoed: Vec<&str> = acc.lines().filter(|l| l.starts_with("echo: 0x")).collect();
    assert_eq!(echoed, vec!["echo: 0x70", "echo: 0x56", "echo: 0x0a"]);
}

#[test]
fn serial_socket_carries_output_with_backlog_and_input() {
    let _l = vm_lock();
    let dir = scratch("sock");
    let sock = dir.join("console.sock");
    let g = guest();
    let serial = format!("socket:{}", sock.display());
    let child = command(&[
        "--kernel",
        g.to_str().unwrap(),
        "--cmdline",
        "echo=1",
        "--serial",
        &serial,
    ])
    .spawn()
    .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < deadline(), "socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Connect late on purpose: the report printed before is in the backlog.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut acc = String::new();
    read_until(&mut c, &mut acc, "echo: ready");
    assert!(acc.contains("partvisor-testguest 1"), "{acc}");
    c.write_all(b"Z").unwrap();
    read_until(&mut c, &mut acc, "exit:");
    assert!(acc.lines().any(|l| l == "echo: 0x5a"), "{acc}");
    let r = wait(child, "socket console");
    assert_eq!(r.code(), 0, "{}", r.log);
}

#[test]
fn i8042_reset_ends_with_its_own_status() {
    let _l = vm_lock();
    let r = run_guest("reset", &[]);
    assert_eq!(r.code(), 71, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert!(
        r.exit_line()
            .contains("reason=reset status=71 source=i8042"),
        "{}",
        r.exit_line()
    );
}

/// The memfd behind guest memory, found through /proc/PID/fd, and its seals.
fn guest_memfd_seals(pid: u32) -> i32 {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let path = entry.unwrap().path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if target
            .to_string_lossy()
            .starts_with("/memfd:partvisor-guest-mem")
        {
            let f = std::fs::File::open(&path).unwrap();
            return part_vmm::memory::seals(&f).unwrap();
        }
    }
    panic!("part-vmm {pid} has no /memfd:partvisor-guest-mem descriptor");
}

#[test]
fn idle_guest_sleeps_is_memfd_backed_and_stops_politely_on_sigterm() {
    let _l = vm_lock();
    let mut cmd = guest_command("stay", &["--vcpus", "2", "--stop-timeout-ms", "20000"]);
    let mut vm = Running::start(&mut cmd, "stay: idle");
    let pid = vm.pid();

    let seals = guest_memfd_seals(pid);
    assert_eq!(seals & libc::F_SEAL_GROW, libc::F_SEAL_GROW);
    assert_eq!(seals & libc::F_SEAL_SHRINK, libc::F_SEAL_SHRINK);

    // Idle: < 5 % of one core over two seconds.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = (cpu_ticks(pid) - t0) as f64 / clock_ticks_per_sec() as f64;
    let share = used / w0.elapsed().as_secs_f64();
    assert!(
        share < 0.05,
        "idle guest used {:.1} % of a core",
        share * 100.0
    );

    vm.signal(libc::SIGTERM);
    let stopped = Instant::now();
    vm.read_until("stop: power button");
    let r = vm.finish("polite stop");
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert!(stopped.elapsed() < Duration::from_secs(20));
    assert!(
        r.exit_line().contains("reason=power-off status=0"),
        "{}",
        r.exit_line()
    );
    assert!(r
        .log
        .contains("stop requested: pressing the ACPI power button"));
}

#[test]
fn guest_that_ignores_the_power_button_is_stopped_by_force_after_the_timeout() {
    let _l = vm_lock();
    // While waiting for serial input the guest does not listen to the GED.
    let mut cmd = guest_command("echo=1", &["--stop-timeout-ms", "700"]);
    cmd.stdin(Stdio::piped());
    let vm = Running::start(&mut cmd, "echo: ready");
    let signalled = Instant::now();
    vm.signal(libc::SIGTERM);
    let r = vm.finish("forced stop");
    let took = signalled.elapsed();
    assert_eq!(r.code(), 74, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert!(
        r.exit_line().contains("reason=forced-stop status=74"),
        "{}",
        r.exit_line()
    );
    assert!(
        took >= Duration::from_millis(700),
        "stopped after {took:?}, before the timeout"
    );
}

fn control_request(sock: &std::path::Path, line: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn control_socket_answers_ping_stops_the_partition_and_the_exit_file_records_why() {
    let _l = vm_lock();
    let dir = scratch("control");
    let (sock, exit_file) = (dir.join("control.sock"), dir.join("exit.json"));
    let (s, e) = (sock.to_str().unwrap(), exit_file.to_str().unwrap());
    let mut cmd = guest_command("stay", &["--control-socket", s, "--exit-file", e]);
    let vm = Running::start(&mut cmd, "stay: idle");
    let pong = control_request(&sock, r#"{"op":"ping"}"#);
    assert_eq!(pong["ok"], true);
    assert_eq!(pong["state"], "running");
    assert_eq!(pong["pid"], vm.pid());
    let bad = control_request(&sock, r#"{"op":"reboot"}"#);
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("unknown variant"));
    let stopping = control_request(&sock, r#"{"op":"stop"}"#);
    assert_eq!(stopping["state"], "stopping");
    let r = vm.finish("control stop");
    assert_eq!(r.code(), 0, "{}", r.log);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&exit_file).unwrap()).unwrap();
    assert_eq!(record["reason"], "power-off");
    assert_eq!(record["status"], 0);
    assert!(!sock.exists(), "the control socket is removed at exit");
}

#[test]
fn control_socket_force_stop_ends_at_once_with_the_forced_status() {
    let _l = vm_lock();
    let dir = scratch("control-force");
    let (sock, exit_file) = (dir.join("control.sock"), dir.join("exit.json"));
    let (s, e) = (sock.to_str().unwrap(), exit_file.to_str().unwrap());
    let mut cmd = guest_command("stay", &["--control-socket", s, "--exit-file", e]);
    let vm = Running::start(&mut cmd, "stay: idle");
    assert_eq!(
        control_request(&sock, r#"{"op":"stop","force":true}"#)["ok"],
        true
    );
    let r = vm.finish("forced control stop");
    assert_eq!(r.code(), 74, "{}", r.log);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&exit_file).unwrap()).unwrap();
    assert_eq!(record["reason"], "forced-stop");
}

#[test]
fn vcpu_threads_are_confined_to_the_cpu_affinity() {
    let _l = vm_lock();
    let dir = scratch("affinity");
    let g = guest();
    let last_cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let cfg = serde_json::json!({
        "vcpus": 2, "memory_mib": 32, "kernel": g, "cmdline": "stay",
        "cpu_affinity": [last_cpu]
    });
    let path = write_file(&dir, "p.json", cfg.to_string().as_bytes());
    let vm = Running::start(
        &mut command(&["--config", path.to_str().unwrap()]),
        "stay: idle",
    );
    let pid = vm.pid();
    let mut vcpus = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap();
        if !comm.starts_with("vcpu") {
            continue;
        }
        vcpus += 1;
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        assert_eq!(allowed, last_cpu.to_string(), "{} of part-vmm", comm.trim());
    }
    assert_eq!(vcpus, 2);
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish("affinity stop").code(), 0);
}

#[test]
fn unwritable_serial_output_is_logged_once_and_counted() {
    let _l = vm_lock();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let child = guest_command("", &[]).stdout(full).spawn().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(log.matches("serial output lost a byte").count(), 1, "{log}");
    let lost = log
        .lines()
        .find_map(|l| l.split("serial output: ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no loss count in:\n{log}"));
    assert!(lost > 100, "the whole report was lost, got {lost}");
}
