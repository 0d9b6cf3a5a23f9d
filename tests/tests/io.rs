//! partd starting I/O partitions (`part-io blk`, `part-io net`) with their
//! guests, through partctl (issue 7, item 2): boot order, disks, a switch
//! between two partitions, memory released only after the backends let go.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use partvisor_e2e::{alive, console_of, vm_lock, wait_console, Partd};
use resource_db::PartitionId;

const BOOT: Duration = Duration::from_secs(90);

/// The part-io process of `kind` in a `show` view.
fn io_of<'a>(v: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    v["io"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["kind"] == kind))
        .unwrap_or_else(|| panic!("no part-io {kind} in {v}"))
}

/// One JSON line from a part-io net stats socket.
fn stats(socket: &Path) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn port_stats<'a>(stats: &'a serde_json::Value, socket: &str) -> &'a serde_json::Value {
    stats["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["socket"] == socket)
        .unwrap_or_else(|| panic!("no port {socket} in {stats}"))
}

/// The RFC 3339 timestamp at the start of the first log line containing
/// `needle` (ANSI colour codes removed).
fn log_time(log: &str, needle: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in log:\n{log}"));
    let mut plain = String::new();
    let mut in_escape = false;
    for c in line.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    let t = plain.split_whitespace().next().unwrap_or("").to_string();
    assert!(t.len() > 20 && t.ends_with('Z'), "no timestamp in {line:?}");
    t
}

/// A sparse 1 MiB disk image `name` in `dir`.
fn disk_image(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    img
}

fn position(log: &str, needle: &str) -> usize {
    log.find(needle)
        .unwrap_or_else(|| panic!("no {needle:?} in partd log:\n{log}"))
}

#[test]
fn disk_and_nic_backends_start_before_the_guest_and_its_memory_returns_only_after_they_unmapped_it()
{
    let _vm = vm_lock();
    let img_dir = tempfile::tempdir().unwrap();
    let img = disk_image(img_dir.path(), "web.img");
    let img_s = img.display().to_string();
    let partd = Partd::start(&["--disk-image", &img_s]);
    let view = partd.view();
    let free_before = view.free().unwrap();
    let def = partd.definition_with(
        "web",
        "blk=write:7:64 blk=verify:7:64 stay",
        &format!("[[disk]]\nimage = \"{img_s}\"\n[[nic]]\nswitch = \"lan\"\n"),
    );
    let created = partd.ctl_json(&["create", def.to_str().unwrap()]);
    // The MAC comes from the resource map's pool, at create.
    let mac = created["holdings"]["macs"][0].as_str().unwrap().to_string();
    assert!(mac.starts_with("02:70:76:"), "{created}");

    let started = partd.ctl_json(&["start", "web"]);
    assert_eq!(started["state"], "running");
    assert!(started["start_timings"]["io_us"].as_u64().unwrap() > 0);
    let blk = io_of(&started, "blk").clone();
    let net = io_of(&started, "net").clone();
    assert_eq!(
        (blk["alive"].as_bool(), net["alive"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(net["switch"], "lan");
    let blk_pid = blk["pid"].as_u64().unwrap() as u32;
    let net_pid = net["pid"].as_u64().unwrap() as u32;
    // Disk + MAC granted in the start transaction's holdings.
    let held = view.holdings(&PartitionId::new("web").unwrap()).unwrap();
    assert_eq!(held.devices, vec![img_s.clone()]);
    assert_eq!(held.macs.len(), 1);
    assert_eq!(held.memory_mib(), 64);

    let console = wait_console(&console_of(&started), "stay: idle", BOOT);
    assert!(console.contains("blk: verified 64 blocks ok"), "{console}");
    // No net word in this guest: its NIC is connected by part-vmm (stats below).
    let port_socket = net["sockets"][0].as_str().unwrap().to_string();
    let stats_sock = partd.path().join("switches/lan/run/stats.sock");
    assert_eq!(
        port_stats(&stats(&stats_sock), &port_socket)["connected"],
        true
    );

    // Boot order: both backends listened before the monitor logged anything.
    let dir = partd.path().join("partitions/web");
    let blk_log = std::fs::read_to_string(dir.join("blk.log")).unwrap();
    let net_log = std::fs::read_to_string(partd.path().join("switches/lan/net.log")).unwrap();
    let vmm_log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    let vmm_first = log_time(&vmm_log, "");
    assert!(
        log_time(&blk_log, "serving") < vmm_first,
        "{blk_log}\n{vmm_log}"
    );
    assert!(
        log_time(&net_log, "serving") < vmm_first,
        "{net_log}\n{vmm_log}"
    );

    let stopped = partd.ctl_json(&["stop", "web"]);
    assert_eq!(stopped["state"], "stopped");
    // Released: memory, CPU share and the disk are back; the MAC stays
    // with the partition until destroy.
    let held = view.holdings(&PartitionId::new("web").unwrap()).unwrap();
    assert_eq!(held.memory_mib(), 0);
    assert!(held.devices.is_empty());
    assert_eq!(held.macs.len(), 1);
    let free = view.free().unwrap();
    assert_eq!(free.memory_mib, free_before.memory_mib);
    // ... and only after the backends let go: blk has exited, the switch
    // shows the port disconnected (part-io logs it after unmapping).
    assert!(!alive(blk_pid));
    assert!(alive(net_pid), "the switch outlives its members");
    assert_eq!(
        port_stats(&stats(&stats_sock), &port_socket)["connected"],
        false
    );
    let net_log = std::fs::read_to_string(partd.path().join("switches/lan/net.log")).unwrap();
    assert!(net_log.contains("frontend disconnected"), "{net_log}");
    let log = partd.log();
    let disconnected = position(&log, "web: switch lan port");
    let blk_gone = position(&log, &format!("web: part-io blk pid {blk_pid} has exited"));
    let unmapped = position(&log, "web: every backend has unmapped its memory");
    let released = position(&log, "web: resources released (stopped)");
    assert!(
        blk_gone < unmapped && disconnected < unmapped && unmapped < released,
        "{log}"
    );

    let shown = partd.ctl_ok(&["show", "web"]);
    assert!(shown.contains(&mac), "{shown}");
    partd.ctl_ok(&["destroy", "web"]);
    assert_eq!(view.free().unwrap().macs, free_before.macs);
}

#[test]
fn two_partitions_on_one_switch_exchange_10000_frames_without_loss() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    let nic = "[[nic]]\nswitch = \"lan\"\n";
    let b = partd.definition_with("b", "net=recv:10000 stay", nic);
    let created = partd.ctl_json(&["create", b.to_str().unwrap()]);
    let b_mac = created["holdings"]["macs"][0].as_str().unwrap().to_string();
    let a = partd.definition_with("a", &format!("net=send:{b_mac}:10000:1000 stay"), nic);
    partd.ctl_ok(&["create", a.to_str().unwrap()]);

    let vb = partd.ctl_json(&["start", "b"]);
    let va = partd.ctl_json(&["start", "a"]);
    // One switch for both, started once with both ports.
    assert_eq!(io_of(&va, "net")["pid"], io_of(&vb, "net")["pid"]);
    let got = wait_console(&console_of(&vb), "stay: idle", BOOT);
    assert!(
        got.contains("net: received 10000 frames ok lost=0 bad=0 dup=0"),
        "{got}"
    );
    let sent = wait_console(&console_of(&va), "stay: idle", BOOT);
    assert!(
        sent.contains("net: send 10000 frames 1000 bytes in"),
        "{sent}"
    );
    let st = stats(&partd.path().join("switches/lan/run/stats.sock"));
    let b_port = partd.path().join("switches/lan/run/b-0.sock");
    let bp = port_stats(&st, b_port.to_str().unwrap());
    assert!(bp["rx_frames"].as_u64().unwrap() >= 10_000, "{st}");
    assert_eq!(bp["dropped_full"], 0, "{st}");
    for p in ["a", "b"] {
        assert_eq!(partd.ctl_json(&["stop", p])["state"], "stopped");
    }

    // The definition-level way: `{mac:b}` is filled in at start.
    let c = partd.definition_with("c", "net=send:{mac:b}:100:64 stay", nic);
    partd.ctl_ok(&["create", c.to_str().unwrap()]);
    let vc = partd.ctl_json(&["start", "c"]);
    let pid = vc["vmm"]["pid"].as_u64().unwrap();
    let desc = std::fs::read_to_string(format!("/proc/{pid}/fd/3")).unwrap();
    let cfg = part_vmm::config::VmConfig::from_json(&desc).unwrap();
    assert_eq!(cfg.cmdline, format!("net=send:{b_mac}:100:64 stay"));
    partd.ctl_ok(&["stop", "c", "--force"]);
    let d = partd.definition_with("d", "x={mac:nobody}", "");
    partd.ctl_ok(&["create", d.to_str().unwrap()]);
    let err = partd.ctl_err(&["start", "d"]);
    assert!(err.contains("{mac:nobody:0}: no such partition"), "{err}");
    assert_eq!(partd.ctl_json(&["show", "d"])["state"], "defined");
}

#[test]
fn a_switch_without_a_port_for_a_newcomer_is_restarted_only_when_nobody_is_connected_and_a_dead_one_is_reported(
) {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    let view = partd.view();
    let nic = "[[nic]]\nswitch = \"lan\"\n";
    let a = partd.definition_with("a", "stay", nic);
    partd.ctl_ok(&["create", a.to_str().unwrap()]);
    let va = partd.ctl_json(&["start", "a"]);
    let first = io_of(&va, "net")["pid"].as_u64().unwrap() as u32;
    wait_console(&console_of(&va), "stay: idle", BOOT);

    // c was defined after the switch started: it has no port, and a is
    // connected, so the switch is not restarted and c does not start.
    let c = partd.definition_with("c", "stay", nic);
    partd.ctl_ok(&["create", c.to_str().unwrap()]);
    let err = partd.ctl_err(&["start", "c"]);
    assert!(
        err.contains("switch lan") && err.contains("partitions are connected to it (a)"),
        "{err}"
    );
    let vc = partd.ctl_json(&["show", "c"]);
    assert_eq!(vc["state"], "defined", "{vc}");
    let c_id = PartitionId::new("c").unwrap();
    assert_eq!(view.holdings(&c_id).unwrap().memory_mib(), 0);
    assert!(alive(first), "the busy switch was left alone");

    // Once a is stopped nobody is connected: the switch is restarted with
    // ports for both.
    partd.ctl_ok(&["stop", "a"]);
    let vc = partd.ctl_json(&["start", "c"]);
    assert_eq!(vc["state"], "running");
    let second = io_of(&vc, "net")["pid"].as_u64().unwrap() as u32;
    assert_ne!(second, first);
    assert!(!alive(first));
    let st = stats(&partd.path().join("switches/lan/run/stats.sock"));
    assert_eq!(st["ports"].as_array().unwrap().len(), 2, "{st}");
    wait_console(&console_of(&vc), "stay: idle", BOOT);

    // A switch that dies is reported; the guest keeps running and its stop
    // still releases everything.
    partvisor_e2e::kill(second, libc::SIGKILL);
    partvisor_e2e::wait_gone(second, Duration::from_secs(10));
    let vc = partd.ctl_json(&["show", "c"]);
    assert_eq!(io_of(&vc, "net")["alive"], false, "{vc}");
    assert_eq!(vc["state"], "running");
    let text = partd.ctl_ok(&["show", "c"]);
    assert!(text.contains("GONE"), "{text}");
    let t0 = std::time::Instant::now();
    while !partd
        .log()
        .contains(&format!("c: part-io net pid {second} is gone"))
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", partd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(partd.ctl_json(&["stop", "c"])["state"], "stopped");
    assert_eq!(view.holdings(&c_id).unwrap().memory_mib(), 0);
}

#[test]
fn a_restarted_partd_still_waits_for_the_disk_backend_before_releasing() {
    let _vm = vm_lock();
    let img_dir = tempfile::tempdir().unwrap();
    let img = disk_image(img_dir.path(), "d.img");
    let img_s = img.display().to_string();
    let mut partd = Partd::start(&["--disk-image", &img_s]);
    let def = partd.definition_with(
        "d",
        "blk=write:3:8 stay",
        &format!("[[disk]]\nimage = \"{img_s}\"\nread_only = false\n"),
    );
    partd.ctl_ok(&["create", def.to_str().unwrap()]);
    let v = partd.ctl_json(&["start", "d"]);
    let blk = io_of(&v, "blk")["pid"].as_u64().unwrap() as u32;
    wait_console(&console_of(&v), "stay: idle", BOOT);

    partd.restart();
    let v = partd.ctl_json(&["show", "d"]);
    assert_eq!(v["state"], "running");
    assert_eq!(io_of(&v, "blk")["pid"].as_u64(), Some(u64::from(blk)));
    assert_eq!(io_of(&v, "blk")["alive"], true);
    assert_eq!(partd.ctl_json(&["stop", "d"])["state"], "stopped");
    assert!(!alive(blk));
    let d = PartitionId::new("d").unwrap();
    assert!(partd.view().holdings(&d).unwrap().is_at_rest());
    let log = partd.log();
    assert!(
        position(&log, &format!("d: part-io blk pid {blk} has exited"))
            < position(&log, "d: resources released (stopped)"),
        "{log}"
    );
}

#[test]
fn a_nic_whose_socket_path_cannot_be_bound_is_refused_before_anything_is_granted() {
    let partd = Partd::start(&[]);
    let name = format!("p{}", "x".repeat(63));
    let def = partd.definition_with(
        &name,
        "stay",
        &format!("[[nic]]\nswitch = \"{}\"\n", "s".repeat(32)),
    );
    partd.ctl_ok(&["create", def.to_str().unwrap()]);
    let err = partd.ctl_err(&["start", &name]);
    assert!(err.contains("longer than 107 bytes"), "{err}");
    let v = partd.ctl_json(&["show", &name]);
    assert_eq!(v["state"], "defined");
    assert_eq!(v["holdings"]["memory"], serde_json::json!([]), "{v}");
}
