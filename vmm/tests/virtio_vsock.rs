//! virtio-vsock through part-vmm's vhost-user frontend and `part-io vsock`:
//! the handshake, the CID the backend must confirm, and the flags.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

const BAD_INPUT: i32 = 64;

/// Starts `part-io vsock` with one port (`cid`) and a stats socket.
fn start_relay(dir: &Path, cid: u32) -> (Backend, PathBuf, PathBuf) {
    let sock = dir.join("v.sock");
    let stats = dir.join("vsock-stats.sock");
    let backend = spawn_vsock_relay(
        dir,
        &[format!("socket={},cid={cid}", sock.display())],
        &stats,
    );
    (backend, sock, stats)
}

fn connections(stats: &Path) -> u64 {
    switch_stats(stats)["ports"][0]["connections"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_guest_boots_with_its_vsock_device_when_the_backend_confirms_the_cid() {
    let _l = vm_lock();
    let dir = scratch("vsock-boot");
    let (relay, sock, stats) = start_relay(&dir, 3);
    let r = run_guest(
        "",
        &[
            "--vhost-user-vsock",
            sock.to_str().unwrap(),
            "--vsock-cid",
            "3",
        ],
    );
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert!(
        r.log.contains("virtio-vsock0: ") && r.log.contains(&sock.display().to_string()),
        "{}",
        r.log
    );
    assert_eq!(connections(&stats), 1, "{}", relay.log_text());
}

#[test]
fn two_guests_exchange_a_verified_stream_and_a_third_not_accepted_is_refused() {
    let _l = vm_lock();
    let dir = scratch("vsock-pair");
    let (a, b, c) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let stats = dir.join("stats.sock");
    let relay = spawn_vsock_relay(
        &dir,
        &[
            format!("socket={},cid=3", a.display()),
            format!("socket={},cid=4,accept=3:5000", b.display()),
            format!("socket={},cid=5", c.display()),
        ],
        &stats,
    );

    let vb = vsock_args(&b, 4);
    let vb: Vec<&str> = vb.iter().map(String::as_str).collect();
    let listener = Running::start(
        &mut guest_command("vsock=listen:5000:1M", &vb),
        "vsock: listening",
    );
    let t0 = std::time::Instant::now();
    while vsock_port_stat(&stats, 4, "rx_ready") != true {
        assert!(t0.elapsed() < deadline(), "{}", relay.log_text());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let va = vsock_args(&a, 3);
    let va: Vec<&str> = va.iter().map(String::as_str).collect();
    let sender = run_guest("vsock=send:4:5000:1M", &va);
    assert_eq!(
        sender.code(),
        0,
        "serial:\n{}\nlog:\n{}\nrelay:\n{}",
        sender.serial,
        sender.log,
        relay.log_text()
    );
    assert!(
        sender
            .value("vsock: sent")
            .starts_with("1048576 bytes to 4:5000 in "),
        "{}",
        sender.serial
    );
    let rx = listener.finish("listener");
    assert_eq!(rx.code(), 0, "serial:\n{}\nlog:\n{}", rx.serial, rx.log);
    assert!(
        rx.value("vsock: received")
            .starts_with("1048576 bytes from 3:"),
        "{}",
        rx.serial
    );
    eprintln!(
        "guest to guest through part-io vsock (debug build, nested KVM): {} / {}",
        sender.value("vsock: sent"),
        rx.value("vsock: received")
    );
    assert_eq!(vsock_port_stat(&stats, 3, "credit_violations"), 0);
    assert_eq!(
        vsock_port_stat(&stats, 3, "lookups"),
        1,
        "one lookup per connection"
    );

    let vc = vsock_args(&c, 5);
    let vc: Vec<&str> = vc.iter().map(String::as_str).collect();
    let refused = run_guest("vsock=send:4:5000:4096", &vc);
    assert_eq!(refused.code(), 34, "serial:\n{}", refused.serial);
    assert_eq!(refused.lines("vsock: connect to 4:5000 refused").len(), 1);
    assert_eq!(vsock_port_stat(&stats, 5, "refused"), 1);
}

#[test]
fn a_backend_serving_another_cid_is_refused_before_the_guest_runs() {
    let _l = vm_lock();
    let dir = scratch("vsock-cid");
    let (_relay, sock, _stats) = start_relay(&dir, 3);
    let r = run_guest(
        "",
        &[
            "--vhost-user-vsock",
            sock.to_str().unwrap(),
            "--vsock-cid",
            "4",
        ],
    );
    assert_eq!(r.code(), BAD_INPUT, "log:\n{}", r.log);
    assert!(
        r.log
            .contains("its config space gives the guest CID 3, but this partition's CID is 4"),
        "{}",
        r.log
    );
    assert!(!r.serial.contains("partvisor-testguest"), "the guest ran");
}

#[test]
fn vsock_flags_come_as_a_pair_and_reserved_cids_are_refused() {
    let g = guest();
    let kernel = g.to_str().unwrap();
    let r = run(&[
        "--kernel",
        kernel,
        "--vhost-user-vsock",
        "/nonexistent.sock",
    ]);
    assert_eq!(r.code(), BAD_INPUT, "{}", r.log);
    assert!(r.log.contains("--vsock-cid"), "{}", r.log);
    let r = run(&["--kernel", kernel, "--vsock-cid", "3"]);
    assert_eq!(r.code(), BAD_INPUT, "{}", r.log);
    assert!(r.log.contains("--vhost-user-vsock"), "{}", r.log);
    let r = run(&[
        "--kernel",
        kernel,
        "--vhost-user-vsock",
        "/nonexistent.sock",
        "--vsock-cid",
        "2",
    ]);
    assert_eq!(r.code(), BAD_INPUT, "{}", r.log);
    assert!(
        r.log.contains("vsock guest_cid 2: must be at least 3"),
        "{}",
        r.log
    );
}
