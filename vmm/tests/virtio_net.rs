//! virtio-net through part-vmm's vhost-user frontend and `part-io net`
//! switches, driven by the test guest's CPL 3 virtio-net driver.

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
