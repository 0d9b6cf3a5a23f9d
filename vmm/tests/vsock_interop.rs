//! virtio-vsock with peers this project did not write:
//!
//! - part-vmm as the frontend of rust-vmm's `vhost-device-vsock` (installed
//!   by `resources/setup.sh`, pinned): our guest talks to host processes
//!   through its Unix-socket backend, both ways;
//! - QEMU microvm's `vhost-user-vsock-device` as a frontend of
//!   `part-io vsock`: our guest in QEMU talks to our guest in part-vmm.
//!
//! Both peers are required (CI installs them); a missing one fails the test
//! with the command that was not found.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use partvisor_test_guest::vsock_host;

/// Bytes each way.
const BYTES: &str = "1M";
const N: u64 = 1 << 20;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A peer process, killed when dropped.
struct Peer {
    child: Child,
    log: PathBuf,
}

impl Peer {
    fn start(cmd: &mut Command, log: PathBuf, what: &str) -> Peer {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{what} is needed for this test (resources/setup.sh installs it): {e}")
            });
        Peer { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `sum=` of the last serial line that starts with `prefix` (the
/// latest connection's, when several match).
fn sum_of(serial: &str, prefix: &str) -> String {
    let line = serial
        .lines()
        .rfind(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{serial}"));
    line.rsplit("sum=").next().unwrap().trim().to_string()
}

#[test]
fn our_guest_talks_to_host_sockets_through_vhost_device_vsock_both_ways() {
    let _l = vm_lock();
    let dir = scratch("vsock-vdv");
    let sock = dir.join("vdv.sock");
    let uds = dir.join("vm.vsock");
    let vdv = Peer::start(
        Command::new("vhost-device-vsock").args([
            "--vm",
            &format!(
                "guest-cid=3,socket={},uds-path={}",
                sock.display(),
                uds.display()
            ),
        ]),
        dir.join("vdv.log"),
        "vhost-device-vsock",
    );
    wait_for_sockets(&[&sock]);
    // The guest's connection to host port 6000 reaches `<uds>_6000`.
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let served = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        vsock_host::exchange(s, N, N, deadline()).unwrap()
    });
    let va = vsock_args(&sock, 3);
    let guest = Running::start(
        &mut guest_command(
            &format!("vsock=send:2:6000:{BYTES}:{BYTES} vsock=listen:6001:{BYTES}:{BYTES}"),
            &strs(&va),
        ),
        "vsock: listening on port 6001",
    );
    let ex = served.join().unwrap();
    assert_eq!(ex.received_bytes, N);
    assert_eq!(
        sum_of(&guest.serial, "vsock: sent 1048576 bytes to 2:6000 "),
        ex.received
    );
    assert_eq!(
        sum_of(&guest.serial, "vsock: received 1048576 bytes from 2:6000 "),
        ex.sent
    );

    // A host process opens the other connection (vhost-device-vsock answers
    // `OK <port>` as Firecracker does).
    let (s, _) = vsock_host::connect(&uds, 6001).unwrap();
    let ex = vsock_host::exchange(s, N, N, deadline()).unwrap();
    let r = guest.finish("guest on vhost-device-vsock");
    assert_eq!(
        r.code(),
        0,
        "serial:\n{}\nlog:\n{}\nvhost-device-vsock:\n{}",
        r.serial,
        r.log,
        vdv.log_text()
    );
    assert_eq!(ex.received_bytes, N);
    assert_eq!(
        sum_of(&r.serial, "vsock: received 1048576 bytes from 2:"),
        ex.sent
    );
    assert_eq!(
        sum_of(&r.serial, "vsock: sent 1048576 bytes to 2:"),
        ex.received
    );
    eprintln!(
        "through vhost-device-vsock: {} / {}",
        r.value("vsock: sent 1048576 bytes to 2:6000"),
        r.lines("vsock: received 1048576 bytes from 2:")[1]
    );
}

/// QEMU microvm running the test guest with `cmdline` and a
/// vhost-user-vsock-device on `sock`.
fn qemu_vsock(sock: &Path, cmdline: &str, log: PathBuf) -> (Child, PathBuf) {
    let cpu =
        std::env::var("PARTVISOR_QEMU_CPU").unwrap_or_else(|_| "host,-arch-capabilities".into());
    let serial = log.with_extension("serial");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off,memory-backend=mem",
            "-enable-kvm",
            "-cpu",
            &cpu,
        ])
        .args([
            "-m",
            "32M",
            "-smp",
            "1",
            "-nographic",
            "-nodefaults",
            "-no-reboot",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=32M,share=on"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=c0"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(guest())
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("qemu-system-x86_64 is needed for this test (Debian: qemu-system-x86)");
    (child, serial)
}

#[test]
fn a_qemu_microvm_guest_on_part_io_vsock_talks_to_a_part_vmm_guest() {
    let _l = vm_lock();
    let dir = scratch("vsock-qemu");
    let (ours, theirs) = (dir.join("ours.sock"), dir.join("qemu.sock"));
    let stats = dir.join("stats.sock");
    let relay = spawn_vsock_relay(
        &dir,
        &[
            format!("socket={},cid=3,accept=4:5000", ours.display()),
            format!("socket={},cid=4", theirs.display()),
        ],
        &stats,
    );
    let va = vsock_args(&ours, 3);
    let listener = Running::start(
        &mut guest_command(&format!("vsock=listen:5000:{BYTES}:{BYTES}"), &strs(&va)),
        "vsock: listening",
    );
    let t0 = Instant::now();
    while vsock_port_stat(&stats, 3, "rx_ready") != true {
        assert!(t0.elapsed() < deadline(), "{}", relay.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut qemu, serial) = qemu_vsock(
        &theirs,
        &format!("vsock=send:3:5000:{BYTES}:{BYTES}"),
        dir.join("qemu.log"),
    );
    let status = loop {
        if let Some(s) = qemu.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > deadline() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!(
                "QEMU did not finish: {}\n{}\npart-io:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default(),
                std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default(),
                relay.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let qserial = std::fs::read_to_string(&serial).unwrap();
    // isa-debug-exit: guest code 0 is QEMU status 1.
    assert_eq!(
        status.code(),
        Some(1),
        "QEMU guest:\n{qserial}\nQEMU:\n{}\npart-io:\n{}",
        std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default(),
        relay.log_text()
    );
    assert!(qserial.contains("vsock: ready cid=4"), "{qserial}");
    let rx = listener.finish("listener");
    assert_eq!(rx.code(), 0, "serial:\n{}\nlog:\n{}", rx.serial, rx.log);
    assert_eq!(
        sum_of(&qserial, "vsock: sent 1048576 bytes to 3:5000 "),
        sum_of(&rx.serial, "vsock: received 1048576 bytes from 4:"),
        "QEMU guest -> part-vmm guest"
    );
    assert_eq!(
        sum_of(&rx.serial, "vsock: sent 1048576 bytes to 4:"),
        sum_of(&qserial, "vsock: received 1048576 bytes from 3:5000 "),
        "part-vmm guest -> QEMU guest"
    );
    assert_eq!(vsock_port_stat(&stats, 4, "connections"), 1);
    assert_eq!(vsock_port_stat(&stats, 4, "lookups"), 1);
    eprintln!(
        "QEMU guest <-> part-vmm guest through part-io vsock: {} / {}",
        rx.value("vsock: received"),
        rx.value("vsock: sent")
    );
}
