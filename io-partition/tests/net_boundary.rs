//! The vhost-user boundary of `part-io net` against a hostile frontend
//! (issue 12, item 4): a pipe as a call fd, another uid at the socket, a
//! memory table larger than the partition's grant. Each is refused, and
//! the other ports keep switching.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::net::*;
use common::*;

const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

#[test]
fn a_pipe_as_call_fd_is_refused_and_the_switch_keeps_switching() {
    use std::os::fd::FromRawFd;
    use vhost::VhostBackend;
    let p = spawn_switch(&[A, B], &[]);
    let a = attach(&p, 0, 16);
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the read end is closed here, the write end handed over as if
    // it were an eventfd (a frontend can send any descriptor).
    let pipe = unsafe {
        libc::close(fds[0]);
        vmm_sys_util::eventfd::EventFd::from_raw_fd(fds[1])
    };
    // A full pipe would block the worker that signals it, and with it
    // every port that worker serves: the guard ends this connection.
    let _ = a.fe.set_vring_call(0, &pipe);
    p.wait_log("SET_VRING_CALL: the descriptor is pipe:");
    drop(a);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    let f = frame(B, A, b"after the pipe");
    a.send(&f);
    assert_eq!(b.recv(), f);
}

/// Connects to `path` from a thread whose uid (only) is 65534.
fn connect_as_nobody(path: std::path::PathBuf) -> std::io::Result<std::os::unix::net::UnixStream> {
    std::thread::spawn(move || {
        // SAFETY: the raw system call changes this thread's uids only (the
        // C library's wrapper would change every thread's).
        let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
        std::os::unix::net::UnixStream::connect(&path)
    })
    .join()
    .unwrap()
}

#[test]
fn another_uid_cannot_reach_a_port_and_is_refused_if_the_socket_is_opened_up() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        partvisor_runtime::ci::environment_missing("root, to act as another uid");
        return;
    }
    let p = spawn_switch(&[A, B], &[]);
    let sock = port_sock(&p, 0);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "vhost-user sockets are owner-only");
    std::fs::set_permissions(p.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = connect_as_nobody(sock.clone()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    // With the mode opened up by mistake, part-io's own uid check refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut s = connect_as_nobody(sock).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed by part-io");
    p.wait_log("refused a frontend of uid 65534");
    // root's frontends are served as before.
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    let f = frame(B, A, b"still served");
    a.send(&f);
    assert_eq!(b.recv(), f);
}

#[test]
fn a_memory_table_larger_than_the_grant_is_refused_and_other_ports_keep_switching() {
    const C: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0c];
    let dir = tempfile::tempdir().unwrap();
    let port = |i: usize, mac: [u8; 6], memory: u64| {
        format!(
            "socket={},mac={},memory={memory}",
            dir.path().join(format!("p{i}.sock")).display(),
            mac_str(mac)
        )
    };
    let args = vec![
        "net".to_string(),
        "--port".into(),
        port(0, C, 2),
        "--port".into(),
        port(1, A, 64),
        "--port".into(),
        port(2, B, 64),
        "--stats-socket".into(),
        dir.path().join("stats.sock").display().to_string(),
    ];
    let p = PartIo::spawn_args(dir, &args, 3);
    // The test frontend's 4 MiB against port 0's grant of 2 MiB.
    let r = NetDevice::connect(&port_sock(&p, 0), guest_memory(SEALED), NET_QSIZE, false);
    assert!(r.is_err(), "a table larger than the grant must be refused");
    p.wait_log("more than the 0x200000 bytes the partition was granted");
    wait_until("the refusal to be counted", || {
        port_stat(&p, 0, "refused_regions") == 1
    });
    // Ports granted enough are served and switch frames.
    let mut a = attach(&p, 1, 16);
    let mut b = attach(&p, 2, 16);
    let f = frame(B, A, b"within the grant");
    a.send(&f);
    assert_eq!(b.recv(), f);
}
