//! `part-io net --tap`: frames between the host (the tap interface) and ports.
//!
//! part-io holds the tap's file descriptor; the host side is the kernel
//! interface. The test talks to it with an `AF_PACKET` socket bound to the
//! interface: a frame it sends leaves the interface and is read by part-io
//! from the tap fd, and a frame part-io writes to the tap fd is received on
//! the interface, where the packet socket sees it. Needs root (`TUNSETIFF`,
//! `AF_PACKET`) and `/dev/net/tun`; otherwise each test fails under
//! `CI=true` and elsewhere prints `skipped: <reason>` and returns.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::net::*;
use common::TIMEOUT;

const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
const QUIET: Duration = Duration::from_millis(100);

fn skip_reason() -> Option<String> {
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for TUNSETIFF and AF_PACKET".into());
    }
    None
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: all-zero is a valid ifreq.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

/// Opens /dev/net/tun attached to tap `name` (creating it).
fn tun_attach(name: &str) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF on our fd with a valid ifreq.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut r) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    f
}

/// A persistent tap created by the test, deleted on drop.
struct TestTap(String);

impl TestTap {
    fn create(name: &str) -> TestTap {
        let f = tun_attach(name);
        // SAFETY: TUNSETPERSIST on our tun fd.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1) };
        assert_eq!(rc, 0);
        drop(f);
        // Keep the kernel quiet on the interface (no IPv6 autoconf chatter).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        set_up(name);
        TestTap(name.to_string())
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        // part-io is gone by now (it is dropped first), so we can attach.
        let f = tun_attach(&self.0);
        // SAFETY: TUNSETPERSIST on our tun fd.
        unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 0) };
    }
}

fn socket(domain: i32, ty: i32, proto: i32) -> OwnedFd {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn set_up(name: &str) {
    let s = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    let mut r = ifreq(name);
    // SAFETY: SIOC[GS]IFFLAGS with a valid ifreq.
    unsafe {
        assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r), 0);
        r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &r), 0);
    }
}

fn if_flags(name: &str) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// An AF_PACKET socket on the host side of the tap.
struct HostSide(OwnedFd);

impl HostSide {
    fn open(name: &str) -> HostSide {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let s = socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        let ifname = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        assert_ne!(ifindex, 0);
        // SAFETY: all-zero sockaddr_ll is valid; filled below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a sockaddr_ll of the right size.
        let rc = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        HostSide(s)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send from a live slice on a bound packet socket.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next test frame (our ethertype) received on the interface.
    fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: all-zero sockaddr_ll is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom into live buffers of the given sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            // Only frames the interface received (written to the tap fd by
            // part-io), not our own outgoing ones, and only test frames.
            if n >= 14
                && from.sll_pkttype != libc::PACKET_OUTGOING
                && buf[12..14] == ETHERTYPE.to_be_bytes()
            {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }
}

/// The next frame of the test's ethertype at a port (the kernel may send
/// its own frames out of the interface, which the switch floods).
fn recv_test(d: &mut NetDevice, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = d.recv_timeout(left)?;
        if f[12..14] == ETHERTYPE.to_be_bytes() {
            return Some(f);
        }
    }
}

fn tap_name(tag: &str) -> String {
    format!("ptio{tag}{}", std::process::id() % 100_000)
}

#[test]
fn frames_cross_between_the_tap_and_the_ports() {
    if let Some(r) = skip_reason() {
        partvisor_runtime::ci::environment_missing(r);
        return;
    }
    let name = tap_name("u");
    let tap = TestTap::create(&name);
    let p = spawn_switch(&[A, B], &["--tap", &name]);
    p.wait_log(&format!("uplink tap {name} attached"));
    let host = HostSide::open(&name);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);

    // Host to one port: only that port gets it; the host's MAC is learned.
    let down = frame(A, HOST, b"from the host to A");
    host.send(&down);
    assert_eq!(recv_test(&mut a, TIMEOUT).unwrap(), down);
    // Host broadcast reaches every port.
    let bcast = frame(BROADCAST, HOST, b"host broadcast");
    host.send(&bcast);
    assert_eq!(recv_test(&mut a, TIMEOUT).unwrap(), bcast);
    assert_eq!(
        recv_test(&mut b, TIMEOUT).unwrap(),
        bcast,
        "B saw only the broadcast"
    );

    // Port to the learned host MAC: out of the tap, not to the other port.
    let up = frame(HOST, A, b"from A to the host");
    a.send(&up);
    assert_eq!(host.recv_timeout(TIMEOUT).unwrap(), up);
    let marker = frame(BROADCAST, A, b"barrier");
    a.send(&marker);
    assert_eq!(
        recv_test(&mut b, TIMEOUT).unwrap(),
        marker,
        "B did not get A's unicast to the host"
    );
    assert_eq!(
        host.recv_timeout(TIMEOUT).unwrap(),
        marker,
        "broadcasts go out of the uplink"
    );

    // A frame from the host claiming a port's MAC is refused.
    host.send(&frame(BROADCAST, A, b"spoofed by the host"));
    host.send(&frame(B, HOST, b"after the spoof"));
    assert_eq!(
        recv_test(&mut b, TIMEOUT).unwrap(),
        frame(B, HOST, b"after the spoof")
    );
    assert_eq!(recv_test(&mut a, QUIET), None);

    let s = stats(&p);
    let up = &s["uplink"];
    assert_eq!(up["ifname"], name.as_str());
    assert_eq!(up["dropped_spoof"], 1);
    assert!(up["rx_frames"].as_u64().unwrap() >= 3, "{up}");
    assert!(up["tx_frames"].as_u64().unwrap() >= 2, "{up}");
    assert!(s["learned"].as_u64().unwrap() >= 1);
    drop((a, b));
    drop(p);
    drop(tap);
    assert!(
        !Path::new("/sys/class/net").join(&name).exists(),
        "test tap removed"
    );
}

#[test]
fn a_tap_that_does_not_exist_is_created_up_and_removed_with_the_switch() {
    if let Some(r) = skip_reason() {
        partvisor_runtime::ci::environment_missing(r);
        return;
    }
    let name = tap_name("c");
    assert!(!Path::new("/sys/class/net").join(&name).exists());
    let p = spawn_switch(&[A], &["--tap", &name]);
    p.wait_log(&format!("uplink tap {name} attached (created by part-io"));
    let flags = if_flags(&name).expect("part-io created the tap");
    assert_ne!(flags & libc::IFF_UP as u32, 0, "created tap is up");
    drop(p);
    wait_until("the tap to disappear with part-io", || {
        !Path::new("/sys/class/net").join(&name).exists()
    });
}

#[test]
fn a_tap_held_by_another_process_is_a_one_line_error() {
    if let Some(r) = skip_reason() {
        partvisor_runtime::ci::environment_missing(r);
        return;
    }
    let name = tap_name("b");
    let held = tun_attach(&name);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_part-io"))
        .args([
            "net",
            "--port",
            "socket=/nonexistent/x.sock,mac=02:00:00:00:00:01",
            "--tap",
            &name,
        ])
        .output()
        .unwrap();
    drop(held);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("part-io: cannot attach to tap {name}")),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
