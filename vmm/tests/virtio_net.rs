//! virtio-net through part-vmm's vhost-user frontend and `part-io net`
//! switches, driven by the test guest's CPL 3 virtio-net driver.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";
const MAC_C: &str = "52:54:00:00:00:0c";

fn net_arg(sock: &std::path::Path) -> [String; 2] {
    ["--vhost-user-net".into(), sock.display().to_string()]
}

#[test]
fn two_guests_on_one_switch_exchange_10000_frames_without_loss_and_another_switch_sees_none() {
    let _l = vm_lock();
    let dir = scratch("net-pair");
    let (a, b, c) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let (_sw1, stats1) = start_switch(&dir, "sw1", &[(&a, MAC_A), (&b, MAC_B)]);
    let (_sw2, stats2) = start_switch(&dir, "sw2", &[(&c, MAC_C)]);

    // C listens on the other switch for the whole exchange.
    let nc = net_arg(&c);
    let other = Running::start(
        &mut guest_command("net=mac net=expect-none:4000", &[&nc[0], &nc[1]]),
        "net: ready",
    );
    let nb = net_arg(&b);
    let receiver = Running::start(
        &mut guest_command("net=recv:10000", &[&nb[0], &nb[1]]),
        "net: ready",
    );
    wait_rx_ready(&stats1, MAC_B);
    let na = net_arg(&a);
    let sender = run_guest(
        &format!("net=send:{MAC_B}:10000:1000 net=broadcast:3"),
        &[&na[0], &na[1]],
    );
    assert_eq!(
        sender.code(),
        0,
        "serial:\n{}\nlog:\n{}",
        sender.serial,
        sender.log
    );
    assert_eq!(sender.value("net: sent"), "10000 frames");

    let rx = receiver.finish("receiver");
    assert_eq!(rx.code(), 0, "serial:\n{}\nlog:\n{}", rx.serial, rx.log);
    assert_eq!(
        rx.value("net: received"),
        "10000 frames ok lost=0 bad=0 dup=0"
    );
    let pb = port_stats(&stats1, MAC_B);
    assert_eq!(
        pb["dropped_full"], 0,
        "flow control kept the receiver's ring from overflowing: {pb}"
    );
    assert!(pb["rx_frames"].as_u64().unwrap() >= 10_000, "{pb}");

    let iso = other.finish("other switch");
    assert_eq!(iso.code(), 0, "serial:\n{}", iso.serial);
    assert_eq!(iso.value("net: received"), "0 frames");
    assert_eq!(port_stats(&stats2, MAC_C)["rx_frames"], 0);
}

#[test]
fn spoofed_frames_are_not_delivered_and_are_counted() {
    let _l = vm_lock();
    let dir = scratch("net-spoof");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (_sw, stats) = start_switch(&dir, "sw", &[(&a, MAC_A), (&b, MAC_B)]);
    let nb = net_arg(&b);
    let listener = Running::start(
        &mut guest_command("net=mac net=expect-none:2500", &[&nb[0], &nb[1]]),
        "net: ready",
    );
    wait_rx_ready(&stats, MAC_B);
    let na = net_arg(&a);
    let spoofer = run_guest("net=spoof:5", &[&na[0], &na[1]]);
    assert_eq!(
        spoofer.code(),
        0,
        "serial:\n{}\nlog:\n{}",
        spoofer.serial,
        spoofer.log
    );
    assert_eq!(spoofer.value("net: spoofed"), "5 frames");
    let l = listener.finish("listener");
    assert_eq!(l.value("net: received"), "0 frames", "{}", l.serial);
    let pa = port_stats(&stats, MAC_A);
    assert_eq!(pa["dropped_spoof"], 5, "{pa}");
    assert_eq!(port_stats(&stats, MAC_B)["rx_frames"], 0);
}

/// A tap interface created by the test (deleted on drop), with an
/// `AF_PACKET` socket on its host side: what the socket sends leaves the
/// interface into the tap fd that part-io holds, and what part-io writes to
/// the tap fd arrives on the interface.
struct HostTap {
    name: String,
    sock: std::os::fd::OwnedFd,
}

impl HostTap {
    fn create(name: &str) -> Result<HostTap, String> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .map_err(|e| format!("ip (iproute2) not runnable: {e}"))
                .and_then(|s| {
                    s.success()
                        .then_some(())
                        .ok_or(format!("ip {args:?} failed"))
                })
        };
        // A tap left by a crashed run of this test; usually absent.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        ip(&["link", "set", "dev", name, "up"])?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        // SAFETY: all-zero sockaddr_ll is valid; filled below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a sockaddr_ll of the right size.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(format!(
                "bind AF_PACKET: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(HostTap {
            name: name.into(),
            sock,
        })
    }

    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: sends from a live slice on a bound packet socket.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// Frames of the test ethertype seen on the interface within `timeout`.
    fn collect(&self, want: usize, timeout: std::time::Duration) -> Vec<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let end = std::time::Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 2048];
        while got.len() < want {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: receives into a live buffer of its length.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                let f = &buf[..n as usize];
                if partvisor_test_guest::net_frame::ethertype(f)
                    == partvisor_test_guest::net_frame::ETHERTYPE
                {
                    got.push(f.to_vec());
                }
            }
        }
        got
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

#[test]
fn frames_cross_the_tap_uplink_both_ways_between_host_and_guest() {
    use partvisor_test_guest::net_frame::{self, Kind};
    if !std::path::Path::new("/dev/net/tun").exists() {
        partvisor_runtime::ci::environment_missing("/dev/net/tun is missing");
        return;
    }
    let _l = vm_lock();
    let dir = scratch("net-tap");
    let tap_name = format!("pvt{}", std::process::id() % 100_000);
    let tap = match HostTap::create(&tap_name) {
        Ok(t) => t,
        Err(e) => {
            partvisor_runtime::ci::environment_missing(format!("cannot create a tap here: {e}"));
            return;
        }
    };
    let a = dir.join("a.sock");
    let stats = dir.join("sw-stats.sock");
    let args: Vec<String> = [
        "net".to_string(),
        "--port".into(),
        format!("socket={},mac={MAC_A}", a.display()),
        "--tap".into(),
        tap_name.clone(),
        "--stats-socket".into(),
        stats.display().to_string(),
    ]
    .into();
    let switch = spawn_part_io(&args, dir.join("sw.log"));
    wait_for_sockets(&[&a, &stats]);
    let na = net_arg(&a);
    let mut vm = Running::start(
        &mut guest_command("net=recv-any:1:0x88b5 net=broadcast:3", &[&na[0], &na[1]]),
        "net: ready",
    );
    wait_rx_ready(&stats, MAC_A);

    // Host -> guest: a test frame written on the host side of the tap.
    let host_mac = [0x02, 0, 0, 0, 0, 0x42];
    let guest_mac = net_frame::parse_mac(MAC_A).unwrap();
    let mut frame = [0u8; 128];
    let len = net_frame::build(&mut frame, guest_mac, host_mac, Kind::ALL[0], 7, 128).unwrap();
    tap.send(&frame[..len]);
    vm.read_until("net: frame src=");
    let line = vm
        .serial
        .lines()
        .find(|l| l.starts_with("net: frame src="))
        .unwrap()
        .to_string();
    assert!(
        line.starts_with(
            "net: frame src=02:00:00:00:00:42 dst=52:54:00:00:00:0a type=0x88b5 len=128"
        ),
        "{line}"
    );

    // Guest -> host: its broadcasts come out of the tap.
    let out = tap.collect(3, deadline());
    let r = vm.finish("tap guest");
    assert_eq!(
        r.code(),
        0,
        "serial:\n{}\nlog:\n{}\nswitch:\n{}",
        r.serial,
        r.log,
        switch.log_text()
    );
    assert_eq!(
        out.len(),
        3,
        "frames from the guest on the host side: {}",
        out.len()
    );
    for f in &out {
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &guest_mac);
        assert!(net_frame::parse(f).is_ok_and(|p| p.intact));
    }
}
