//! virtio-blk through part-vmm's virtio-mmio/vhost-user frontend, served by
//! an I/O partition (`part-io blk`) or by qemu-storage-daemon, driven by the
//! test guest's CPL 3 virtio-blk driver.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use partvisor_test_guest::blk_pattern::{self, BLOCK_SIZE};

const IMAGE_SIZE: u64 = 8 << 20;

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    p
}

/// Checks, from the host, that block `b` of the image holds the guest's
/// pattern for `seed` (`partvisor_test_guest::blk_pattern`).
fn assert_block_holds_pattern(img: &[u8], seed: u64, b: u64) {
    let start = b as usize * BLOCK_SIZE;
    let blk: &[u8; BLOCK_SIZE] = img[start..start + BLOCK_SIZE].try_into().unwrap();
    assert_eq!(&blk[0..8], b"pvblk001", "block {b} magic");
    assert!(
        blk_pattern::block_ok(seed, b, blk),
        "block {b} does not hold seed {seed}'s pattern"
    );
}

fn blk_arg(sock: &Path) -> [String; 2] {
    ["--vhost-user-blk".into(), sock.display().to_string()]
}

fn run_with_disk(sock: &Path, cmdline: &str) -> Run {
    let a = blk_arg(sock);
    run_guest(cmdline, &[&a[0], &a[1]])
}

#[test]
fn guest_writes_through_part_io_the_image_holds_it_and_a_second_boot_verifies() {
    let _l = vm_lock();
    let dir = scratch("blk-write");
    let img = image(&dir, "disk.img");
    let sock = dir.join("disk.sock");
    let backend = start_part_io(
        &dir,
        &[format!("socket={},image={}", sock.display(), img.display())],
    );
    wait_for_sockets(&[&sock]);

    let w = run_with_disk(&sock, "blk=write:4242:96 blk=id");
    assert_eq!(w.code(), 0, "serial:\n{}\nlog:\n{}", w.serial, w.log);
    assert_eq!(w.value("blk: wrote"), "96 blocks");
    assert_eq!(w.lines("blk: flush ok").len(), 1);
    assert_eq!(w.value("blk: id"), "disk.img");
    let bytes = std::fs::read(&img).unwrap();
    for b in [0, 1, 47, 95] {
        assert_block_holds_pattern(&bytes, 4242, b);
    }
    assert!(
        bytes[96 * 4096..].iter().all(|x| *x == 0),
        "nothing written past block 95"
    );

    let v = run_with_disk(&sock, "blk=verify:4242:96");
    assert_eq!(v.code(), 0, "serial:\n{}\nlog:\n{}", v.serial, v.log);
    assert_eq!(v.value("blk: verified"), "96 blocks ok");
    // A wrong seed must fail verification: the check can fail.
    let bad = run_with_disk(&sock, "blk=verify:4243:4");
    assert_eq!(bad.code(), 13, "serial:\n{}", bad.serial);
    assert_eq!(bad.value("blk: verify failed at block"), "0");
    drop(backend);
}

#[test]
fn read_only_export_refuses_writes_and_leaves_the_file_unchanged() {
    let _l = vm_lock();
    let dir = scratch("blk-ro");
    let img = image(&dir, "ro.img");
    std::fs::write(&img, vec![0x5a; IMAGE_SIZE as usize]).unwrap();
    let before = std::fs::read(&img).unwrap();
    let sock = dir.join("ro.sock");
    let _backend = start_part_io(
        &dir,
        &[format!(
            "socket={},image={},readonly",
            sock.display(),
            img.display()
        )],
    );
    wait_for_sockets(&[&sock]);
    let r = run_with_disk(&sock, "blk=expect-ro");
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert!(r.value("blk: ready").contains("ro=1"), "{}", r.serial);
    assert_eq!(
        r.lines("blk: write refused (ioerr)").len(),
        1,
        "{}",
        r.serial
    );
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn one_part_io_serves_two_guests_and_malformed_chains_from_one_do_not_disturb_the_other() {
    let _l = vm_lock();
    let dir = scratch("blk-two");
    let (img_a, img_b) = (image(&dir, "a.img"), image(&dir, "b.img"));
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = start_part_io(
        &dir,
        &[
            format!("socket={},image={}", sock_a.display(), img_a.display()),
            format!("socket={},image={}", sock_b.display(), img_b.display()),
        ],
    );
    wait_for_sockets(&[&sock_a, &sock_b]);
    let g = guest();
    let spawn = |sock: &Path, cmdline: &str| {
        let a = blk_arg(sock);
        command(&[
            "--kernel",
            g.to_str().unwrap(),
            "--cmdline",
            cmdline,
            &a[0],
            &a[1],
        ])
        .spawn()
        .unwrap()
    };
    let kinds = ["loop", "long", "indirect", "oob", "nostatus"];
    let hostile_words: Vec<String> = kinds.iter().map(|k| format!("blk=bad:{k}")).collect();
    let hostile = spawn(
        &sock_a,
        &format!("{} blk=write:1:32 blk=verify:1:32", hostile_words.join(" ")),
    );
    let honest = spawn(&sock_b, "blk=write:2:256 blk=verify:2:256");
    let hostile = wait(hostile, "hostile guest");
    let honest = wait(honest, "honest guest");
    assert_eq!(
        honest.code(),
        0,
        "serial:\n{}\nlog:\n{}",
        honest.serial,
        honest.log
    );
    assert_eq!(honest.value("blk: verified"), "256 blocks ok");
    for k in kinds {
        let line = hostile
            .lines(&format!("blk: bad={k} "))
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no bad={k} line:\n{}", hostile.serial));
        // The chain came back with length 0, or the device asked for a
        // reset; either way the guest was answered, not left hanging.
        assert!(
            line.ends_with("used_len=0") || line.ends_with("needs-reset"),
            "{line}"
        );
    }
    assert_eq!(
        hostile.code(),
        0,
        "serial:\n{}\nlog:\n{}",
        hostile.serial,
        hostile.log
    );
    assert_eq!(hostile.value("blk: verified"), "32 blocks ok");
    drop(hostile);
    // part-io counted the malformed chains on export a only.
    std::thread::sleep(Duration::from_millis(200));
    let log = backend.log_text();
    let a_line = log
        .lines()
        .rfind(|l| l.contains("frontend disconnected") && l.contains("a.sock"))
        .unwrap_or_else(|| panic!("no disconnect line for a.sock:\n{log}"));
    assert!(!a_line.contains("malformed.loop=0"), "{a_line}");
    assert!(!a_line.contains("malformed.bad_address=0"), "{a_line}");
    let b_line = log
        .lines()
        .rfind(|l| l.contains("frontend disconnected") && l.contains("b.sock"))
        .unwrap_or_else(|| panic!("no disconnect line for b.sock:\n{log}"));
    for field in [
        "loop",
        "too_long",
        "bad_indirect",
        "bad_address",
        "no_status",
    ] {
        assert!(b_line.contains(&format!("malformed.{field}=0")), "{b_line}");
    }
}

#[test]
fn qemu_storage_daemon_serves_the_same_guest_test() {
    let _l = vm_lock();
    let dir = scratch("blk-qsd");
    let img = image(&dir, "qsd.img");
    let sock = dir.join("qsd.sock");
    let log = dir.join("qsd.log");
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=file0,filename={}", img.display()),
            "--export",
            &format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("qemu-storage-daemon (Debian qemu-system-common) must be installed");
    let _qsd = Backend { child, log };
    wait_for_sockets(&[&sock]);
    let r = run_with_disk(&sock, "blk=write:99:64 blk=verify:99:64");
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert_eq!(r.value("blk: verified"), "64 blocks ok");
    let bytes = std::fs::read(&img).unwrap();
    assert_block_holds_pattern(&bytes, 99, 63);
}

#[test]
fn backend_killed_while_the_guest_idles_leaves_part_vmm_running_and_stoppable() {
    let _l = vm_lock();
    let dir = scratch("blk-kill");
    let img = image(&dir, "k.img");
    let sock = dir.join("k.sock");
    let mut backend = start_part_io(
        &dir,
        &[format!("socket={},image={}", sock.display(), img.display())],
    );
    wait_for_sockets(&[&sock]);
    let a = blk_arg(&sock);
    let vm = Running::start(
        &mut guest_command("blk=write:5:8 stay", &[&a[0], &a[1]]),
        "stay: idle",
    );
    backend.child.kill().unwrap();
    backend.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut vm = vm;
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "part-vmm must survive its backend"
    );
    vm.signal(libc::SIGTERM);
    let r = vm.finish("stop after backend loss");
    assert_eq!(r.code(), 0, "serial:\n{}\nlog:\n{}", r.serial, r.log);
    assert!(
        r.log.contains("virtio-blk0: vhost-user backend") && r.log.contains("device needs reset"),
        "{}",
        r.log
    );
}

#[test]
fn absent_backend_is_a_clear_start_error() {
    let dir = scratch("blk-absent");
    let sock = dir.join("nobody.sock");
    let g = guest();
    let a = blk_arg(&sock);
    let r = run(&["--kernel", g.to_str().unwrap(), &a[0], &a[1]]);
    assert_eq!(r.code(), 64, "{}", r.log);
    assert!(
        r.log
            .contains("cannot connect (is the I/O partition running?)"),
        "{}",
        r.log
    );
}
