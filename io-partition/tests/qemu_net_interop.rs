//! Interop with a virtio-net driver part-io did not write: QEMU's
//! `virtio-net-pci` with a `vhost-user` netdev on a switch port (guest memory
//! from `memory-backend-memfd`, which QEMU seals), driven by the iPXE option
//! ROM that SeaBIOS runs for a network boot. iPXE's DHCP requests are
//! broadcast, so a test-side frontend on another port of the switch sees
//! them, and answers with an offer that iPXE must receive to go on. QEMU supplies the guest's MAC itself (its `mac=` property), so
//! giving QEMU a MAC other than the port's shows the spoofing fence working
//! against a real guest. Needs `qemu-system-x86_64` and its iPXE ROMs
//! (Debian: qemu-system-x86, which depends on ipxe-qemu); runs under TCG.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::net::*;

const PORT0: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// QEMU network-booting through port 0 of `p` with NIC MAC `mac`; killed on drop.
struct Qemu(Child);

impl Qemu {
    fn boot(p: &common::PartIo, mac: [u8; 6]) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args(["-M", "pc", "-accel", "tcg", "-m", "64M", "-nodefaults"])
            .args(["-display", "none", "-monitor", "none", "-serial", "none"])
            .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", port_sock(p, 0).display()))
            .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac={},bootindex=1",
                mac_str(mac)
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 is needed for this test (Debian: qemu-system-x86)");
        Qemu(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// True if `f` is an IPv4/UDP frame from port 68 to port 67 (DHCP request).
fn is_dhcp_request(f: &[u8]) -> bool {
    f.len() >= 14 + 20 + 8
        && f[12..14] == [0x08, 0x00]
        && f[14 + 9] == 17
        && f[14 + 20..14 + 22] == 68u16.to_be_bytes()
        && f[14 + 22..14 + 24] == 67u16.to_be_bytes()
}

/// DHCP message type (option 53) of a DHCP frame.
fn dhcp_type(f: &[u8]) -> Option<u8> {
    let opts = f.get(14 + 20 + 8 + 240..)?;
    let mut i = 0;
    while i + 1 < opts.len() && opts[i] != 255 {
        if opts[i] == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(opts[i + 1]);
        if opts[i] == 53 && len == 1 {
            return opts.get(i + 2).copied();
        }
        i += 2 + len;
    }
    None
}

/// Waits for a DHCP message of `kind` (1 discover, 3 request) at `peer`.
fn wait_dhcp(p: &common::PartIo, peer: &mut NetDevice, kind: u8) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(
            Instant::now() < deadline,
            "no DHCP message {kind} from iPXE: {}",
            p.log()
        );
        if let Some(f) = peer.recv_timeout(Duration::from_millis(200)) {
            if is_dhcp_request(&f) && dhcp_type(&f) == Some(kind) {
                return f;
            }
        }
    }
}

/// A DHCPOFFER from PEER (10.0.0.1) giving 10.0.0.2 to the client of `discover`.
fn dhcp_offer(discover: &[u8]) -> Vec<u8> {
    let bootp_in = &discover[14 + 20 + 8..];
    let mut bootp = vec![0u8; 240];
    bootp[0] = 2; // BOOTREPLY
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&bootp_in[4..8]); // xid
    bootp[16..20].copy_from_slice(&[10, 0, 0, 2]); // yiaddr
    bootp[20..24].copy_from_slice(&[10, 0, 0, 1]); // siaddr
    bootp[28..44].copy_from_slice(&bootp_in[28..44]); // chaddr
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]); // magic cookie
    bootp.extend_from_slice(&[53, 1, 2]); // DHCPOFFER
    bootp.extend_from_slice(&[54, 4, 10, 0, 0, 1]); // server id
    bootp.extend_from_slice(&[51, 4, 0, 0, 0x0e, 0x10]); // lease 3600 s
    bootp.extend_from_slice(&[1, 4, 255, 255, 255, 0]); // netmask
    bootp.push(255);
    let udp_len = 8 + bootp.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no UDP checksum
    udp.extend_from_slice(&bootp);
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 255, 255, 255, 255,
    ];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = BROADCAST.to_vec();
    f.extend_from_slice(&PEER);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&udp);
    f
}

#[test]
fn ipxe_in_qemu_does_dhcp_through_the_switch_both_ways() {
    let p = spawn_switch(&[PORT0, PEER], &[]);
    let mut peer = attach(&p, 1, 64);
    let _qemu = Qemu::boot(&p, PORT0);
    let discover = wait_dhcp(&p, &mut peer, 1);
    assert_eq!(discover[..6], BROADCAST);
    assert_eq!(discover[6..12], PORT0, "sent from the port's MAC");
    // iPXE answers our offer with a DHCPREQUEST only if the offer reached
    // it: through the switch into QEMU's receive queue.
    peer.send(&dhcp_offer(&discover));
    let request = wait_dhcp(&p, &mut peer, 3);
    assert_eq!(request[6..12], PORT0);
    let s = stats(&p);
    assert!(s["ports"][0]["tx_frames"].as_u64().unwrap() >= 2);
    assert!(s["ports"][0]["rx_frames"].as_u64().unwrap() >= 1);
    assert_eq!(s["ports"][0]["dropped_spoof"], 0);
    assert_eq!(s["ports"][0]["tx_bad_frame"], 0);
    assert_eq!(s["ports"][0]["refused_regions"], 0);
}

#[test]
fn a_qemu_guest_with_the_wrong_mac_is_fenced_off() {
    let p = spawn_switch(&[PORT0, PEER], &[]);
    let mut peer = attach(&p, 1, 64);
    let _qemu = Qemu::boot(&p, [0x02, 0, 0, 0, 0, 0xee]);
    wait_until_long("iPXE's frames to be dropped as spoofed", || {
        port_stat(&p, 0, "dropped_spoof") >= 1
    });
    assert_eq!(peer.recv_timeout(Duration::from_millis(200)), None);
    assert_eq!(port_stat(&p, 0, "tx_frames"), 0);
}

fn wait_until_long(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
