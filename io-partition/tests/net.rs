//! `part-io net` driven by test-side vhost-user-net frontends.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::net::*;
use common::*;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;

const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const C: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
const UNKNOWN: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const QUIET: Duration = Duration::from_millis(100);

/// Sends a broadcast marker from `from` and receives it at every device in
/// `at`, asserting that it is the next frame each of them sees: everything
/// `from` sent before it has been forwarded by then.
fn barrier(from: &mut NetDevice, src: [u8; 6], at: &mut [&mut NetDevice]) {
    let marker = frame(BROADCAST, src, b"barrier");
    from.send(&marker);
    for d in at {
        assert_eq!(d.recv(), marker, "expected only the barrier");
    }
}

#[test]
fn config_space_carries_the_port_mac_and_link_up() {
    let p = spawn_switch(&[A, B], &[]);
    let mut d = attach(&p, 1, 0);
    let c = d.config();
    assert_eq!(c[..6], B);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "VIRTIO_NET_S_LINK_UP");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "max_virtqueue_pairs");
    assert_eq!(d.features, NET_WANTED, "VERSION_1, MAC, STATUS offered");
}

#[test]
fn two_ports_exchange_ten_thousand_frames_each_way_with_correct_content() {
    const N: u32 = 10_000;
    const WINDOW: u32 = 128;
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, NET_QSIZE);
    let mut b = attach(&p, 1, NET_QSIZE);
    // Frame sizes cycle through 60..=1514 bytes.
    let len = |seq: u32| 46 + (seq as usize * 97) % (1500 - 46 + 1);
    let (mut sent, mut got) = ([0u32; 2], [0u32; 2]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got != [N, N] {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled at {got:?} of {N}"
        );
        for dir in 0..2 {
            let (tx, rx, src, dst) = if dir == 0 {
                (&mut a, &mut b, A, B)
            } else {
                (&mut b, &mut a, B, A)
            };
            // Flow control: never more frames in flight than the receiver
            // has buffers posted.
            let mut queued = false;
            while sent[dir] < N && sent[dir] - got[dir] < WINDOW {
                if !tx.queue_tx(&seq_frame(dst, src, sent[dir], len(sent[dir]))) {
                    break;
                }
                sent[dir] += 1;
                queued = true;
            }
            if queued {
                tx.kick(1);
            }
            while let Some(f) = rx.try_recv() {
                let seq = got[dir];
                assert_eq!(f, seq_frame(dst, src, seq, len(seq)), "frame {seq}");
                got[dir] += 1;
            }
        }
        std::thread::yield_now();
    }
    a.wait_tx_done();
    b.wait_tx_done();
    assert!(
        a.rx_interrupts > 0 && b.rx_interrupts > 0,
        "receive interrupts"
    );
    let s = stats(&p);
    for i in 0..2 {
        let port = &s["ports"][i];
        assert_eq!(port["tx_frames"], N as u64);
        assert_eq!(port["rx_frames"], N as u64);
        assert_eq!(port["dropped_full"], 0);
        assert_eq!(port["dropped_spoof"], 0);
        assert_eq!(port["connected"], true);
    }
    let bytes: u64 = (0..N).map(|s| len(s) as u64 + 14).sum();
    assert_eq!(s["ports"][0]["tx_bytes"], bytes);
    assert_eq!(s["ports"][1]["rx_bytes"], bytes);
}

#[test]
fn broadcast_and_unknown_unicast_flood_and_known_unicast_goes_to_one_port() {
    let p = spawn_switch(&[A, B, C], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    let mut c = attach(&p, 2, 16);

    let bcast = frame(BROADCAST, A, b"to everyone");
    a.send(&bcast);
    assert_eq!(b.recv(), bcast);
    assert_eq!(c.recv(), bcast);

    let multicast = frame([0x01, 0x00, 0x5e, 0, 0, 1], B, b"group");
    b.send(&multicast);
    assert_eq!(a.recv(), multicast);
    assert_eq!(c.recv(), multicast);

    let unknown = frame(UNKNOWN, A, b"who is this");
    a.send(&unknown);
    assert_eq!(b.recv(), unknown);
    assert_eq!(c.recv(), unknown);

    // Known unicast: only its port, in both directions.
    let to_b = frame(B, A, b"for b only");
    a.send(&to_b);
    assert_eq!(b.recv(), to_b);
    barrier(&mut a, A, &mut [&mut b, &mut c]);
    let to_a = frame(A, C, b"for a only");
    c.send(&to_a);
    assert_eq!(a.recv(), to_a);
    barrier(&mut c, C, &mut [&mut a, &mut b]);

    // A frame never returns to its sender.
    for d in [&mut a, &mut b, &mut c] {
        assert_eq!(d.recv_timeout(QUIET), None);
    }
    let to_self = frame(A, A, b"myself");
    a.send(&to_self);
    barrier(&mut a, A, &mut [&mut b, &mut c]);
    assert_eq!(a.recv_timeout(QUIET), None);
    assert_eq!(port_stat(&p, 0, "tx_frames"), 6);
}

#[test]
fn spoofed_source_mac_is_not_delivered_and_is_counted() {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    // Claiming B's address, an unknown one, or a group address as source.
    for src in [B, UNKNOWN, BROADCAST] {
        a.send(&frame(B, src, b"spoofed"));
        a.send(&frame(BROADCAST, src, b"spoofed"));
    }
    barrier(&mut a, A, &mut [&mut b]);
    assert_eq!(b.recv_timeout(QUIET), None);
    assert_eq!(port_stat(&p, 0, "dropped_spoof"), 6);
    assert_eq!(port_stat(&p, 0, "tx_frames"), 1);
    assert_eq!(port_stat(&p, 1, "rx_frames"), 1);
    // The port keeps working.
    let ok = frame(B, A, b"honest");
    a.send(&ok);
    assert_eq!(b.recv(), ok);
}

#[test]
fn a_full_receive_ring_drops_and_counts_without_stalling_the_sender_or_other_ports() {
    let p = spawn_switch(&[A, B, C], &[]);
    let mut a = attach(&p, 0, 16);
    // B posts 4 buffers and then stops consuming: a stuck guest.
    let mut b = attach(&p, 1, 4);
    b.auto_repost = false;
    let mut c = attach(&p, 2, 64);
    for seq in 0..40u32 {
        a.send(&seq_frame(B, A, seq, 100));
        a.send(&seq_frame(C, A, seq, 100));
        // Sender never waits for B: its buffers come back right away.
        a.wait_tx_done();
        assert_eq!(c.recv(), seq_frame(C, A, seq, 100), "C keeps receiving");
    }
    wait_until("B's drops to be counted", || {
        port_stat(&p, 1, "dropped_full") == 36
    });
    assert_eq!(port_stat(&p, 1, "rx_frames"), 4);
    for seq in 0..4 {
        assert_eq!(b.try_recv().unwrap(), seq_frame(B, A, seq, 100));
    }
    assert_eq!(b.try_recv(), None);
    assert_eq!(port_stat(&p, 2, "dropped_full"), 0);
    assert_eq!(port_stat(&p, 0, "tx_frames"), 80);
    // Once B posts buffers again it receives again.
    b.auto_repost = true;
    b.fill_rx(8);
    let late = frame(B, A, b"late");
    a.send(&late);
    assert_eq!(b.recv(), late);
}

#[test]
fn two_switch_processes_do_not_leak_frames() {
    let one = spawn_switch(&[A, B], &[]);
    let two = spawn_switch(&[A, C], &[]);
    let mut a1 = attach(&one, 0, 16);
    let mut b1 = attach(&one, 1, 16);
    let mut a2 = attach(&two, 0, 16);
    let mut c2 = attach(&two, 1, 16);
    let bcast = frame(BROADCAST, A, b"switch one");
    a1.send(&bcast);
    // Unknown on switch one: flooded there, and only there.
    let to_c = frame(C, A, b"C is on the other switch");
    a1.send(&to_c);
    assert_eq!(b1.recv(), bcast);
    assert_eq!(b1.recv(), to_c);
    barrier(&mut a1, A, &mut [&mut b1]);
    assert_eq!(c2.recv_timeout(QUIET), None);
    assert_eq!(a2.recv_timeout(QUIET), None);
    let s = stats(&two);
    assert_eq!(s["ports"][0]["rx_frames"], 0);
    assert_eq!(s["ports"][1]["rx_frames"], 0);
    // The other switch works on its own.
    let to_c = frame(C, A, b"switch two");
    a2.send(&to_c);
    assert_eq!(c2.recv(), to_c);
    assert_eq!(b1.recv_timeout(QUIET), None);
}

#[test]
fn unsealed_guest_memory_is_refused_and_counted() {
    let p = spawn_switch(&[A, B], &[]);
    let r = NetDevice::connect(&port_sock(&p, 0), guest_memory(0), NET_QSIZE, false);
    assert!(r.is_err(), "an unsealed memfd must be refused");
    p.wait_log("not sealed against");
    wait_until("the refusal to be counted", || {
        port_stat(&p, 0, "refused_regions") == 1
    });
    // The port still serves a correct frontend, and the switch still works.
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    let f = frame(B, A, b"after refusal");
    a.send(&f);
    assert_eq!(b.recv(), f);
}

#[test]
fn malformed_and_bad_transmit_buffers_complete_with_zero_length_and_are_counted() {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    // Too short (header only + 10 bytes), too long, non-zero header (offload
    // not offered), device-writable descriptor, and a descriptor loop.
    assert!(a.queue_tx(&[0u8; 10]));
    assert!(a.queue_tx(&frame(B, A, &[0u8; 1501])));
    let mut hdr = [0u8; 12];
    hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert!(a.queue_tx_raw(&hdr, &frame(B, A, b"csum")));
    a.put_desc(1, 200, 0x20_0000 + 200 * 2048, 64, WRITE, 0);
    a.push_avail(1, 200);
    let next = VRING_DESC_F_NEXT as u16;
    a.put_desc(1, 201, 0x20_0000, 64, next, 202);
    a.put_desc(1, 202, 0x20_0000, 64, next, 201);
    a.push_avail(1, 201);
    a.kick(1);
    barrier(&mut a, A, &mut [&mut b]);
    assert_eq!(b.recv_timeout(QUIET), None);
    let s = stats(&p);
    assert_eq!(s["ports"][0]["tx_bad_frame"], 4);
    assert_eq!(s["ports"][0]["malformed"]["loop"], 1);
    assert_eq!(s["ports"][0]["tx_frames"], 1);
    // Every chain came back (five bad ones and the barrier), all with used
    // length 0 (`reap_tx` checks the lengths).
    wait_until("all transmit chains to come back", || a.used_idx(1) == 6);
    a.reap_tx();
}

#[test]
fn receive_buffers_too_small_are_returned_empty_and_counted() {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b =
        NetDevice::connect(&port_sock(&p, 1), guest_memory(SEALED), NET_QSIZE, false).unwrap();
    b.post_rx_len(0, 40);
    b.post_rx(1);
    b.kick(0);
    wait_rx_ready(&p, 1);
    let f = frame(B, A, &[7u8; 100]);
    a.send(&f);
    a.send(&f);
    wait_until("delivery", || port_stat(&p, 1, "rx_frames") == 1);
    assert_eq!(b.pop_used(0), Some((0, 0)), "short buffer returned empty");
    assert_eq!(b.try_recv(), Some(f));
    assert_eq!(port_stat(&p, 1, "rx_bad_buffer"), 1);
}

#[test]
fn a_disconnected_port_counts_unicast_drops_and_can_reconnect() {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, 16);
    let b = attach(&p, 1, 16);
    drop(b);
    p.wait_log("frontend disconnected; mac=02:00:00:00:00:0b");
    wait_until("port B to show disconnected", || {
        stats(&p)["ports"][1]["connected"] == false
    });
    a.send(&frame(B, A, b"nobody home"));
    a.wait_tx_done();
    wait_until("the drop to be counted", || {
        port_stat(&p, 1, "dropped_down") == 1
    });
    let mut b = attach(&p, 1, 16);
    let f = frame(B, A, b"welcome back");
    a.send(&f);
    assert_eq!(b.recv(), f);
    assert_eq!(port_stat(&p, 1, "connections"), 2);
}

#[test]
fn with_event_idx_frames_and_interrupts_flow_both_ways() {
    let p = spawn_switch(&[A, B], &[]);
    let connect = |i| {
        let mut d =
            NetDevice::connect(&port_sock(&p, i), guest_memory(SEALED), NET_QSIZE, true).unwrap();
        d.fill_rx(NET_QSIZE);
        wait_rx_ready(&p, i);
        d
    };
    let (mut a, mut b) = (connect(0), connect(1));
    assert_ne!(a.features & (1 << 29), 0, "EVENT_IDX negotiated");
    for seq in 0..500 {
        let f = seq_frame(B, A, seq, 200);
        a.send(&f);
        assert_eq!(b.recv(), f);
        let back = seq_frame(A, B, seq, 60);
        b.send(&back);
        assert_eq!(a.recv(), back);
    }
    assert!(
        a.rx_interrupts > 0 && b.rx_interrupts > 0,
        "receive interrupts"
    );
}

/// Inode of the memfd behind guest memory.
fn memfd_inode(mem: &vm_memory::GuestMemoryMmap<()>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    let region = mem.find_region(GuestAddress(0)).unwrap();
    region
        .file_offset()
        .unwrap()
        .file()
        .metadata()
        .unwrap()
        .ino()
}

/// Mappings of memfd `inode` in part-io's address space.
fn mappings_of(p: &PartIo, inode: u64) -> usize {
    std::fs::read_to_string(format!("/proc/{}/maps", p.pid()))
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(inode.to_string().as_str()))
        .count()
}

#[test]
fn after_the_disconnect_line_no_mapping_of_that_guest_is_left() {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    let (ia, ib) = (memfd_inode(&a.mem), memfd_inode(&b.mem));
    // Traffic both ways, so each port's thread has touched the other's memory.
    let (ab, ba) = (frame(B, A, b"a to b"), frame(A, B, b"b to a"));
    a.send(&ab);
    b.send(&ba);
    assert_eq!(b.recv(), ab);
    assert_eq!(a.recv(), ba);
    assert!(
        mappings_of(&p, ib) >= 1,
        "B's memory is mapped while connected"
    );
    drop(b);
    p.wait_log("frontend disconnected; mac=02:00:00:00:00:0b");
    assert_eq!(
        mappings_of(&p, ib),
        0,
        "B's memory unmapped by the disconnect line"
    );
    assert!(mappings_of(&p, ia) >= 1, "A's memory still mapped");
    // A keeps working, and frames for B now count as dropped_down.
    a.send(&frame(B, A, b"gone"));
    a.wait_tx_done();
    wait_until("the drop", || port_stat(&p, 1, "dropped_down") == 1);
}

#[test]
fn frames_split_across_descriptors_arrive_whole() {
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b =
        NetDevice::connect(&port_sock(&p, 1), guest_memory(SEALED), NET_QSIZE, false).unwrap();
    // Receive chain: header alone, 5 bytes (splitting the destination MAC),
    // then the rest.
    let rx = 0x30_0000u64;
    let next = VRING_DESC_F_NEXT as u16;
    b.put_desc(0, 50, rx, 12, WRITE | next, 51);
    b.put_desc(0, 51, rx + 0x100, 5, WRITE | next, 52);
    b.put_desc(0, 52, rx + 0x200, 1600, WRITE, 0);
    b.push_avail(0, 50);
    b.kick(0);
    wait_rx_ready(&p, 1);
    // Transmit chain: header, 8 bytes (splitting the source MAC), the rest.
    let f = seq_frame(B, A, 7, 300);
    let tx = 0x38_0000u64;
    let put = |addr: u64, bytes: &[u8]| {
        vm_memory::Bytes::write_slice(&a.mem, bytes, vm_memory::GuestAddress(addr)).unwrap()
    };
    put(tx, &[0u8; 12]);
    put(tx + 0x100, &f[..8]);
    put(tx + 0x200, &f[8..]);
    a.put_desc(1, 100, tx, 12, next, 101);
    a.put_desc(1, 101, tx + 0x100, 8, next, 102);
    a.put_desc(1, 102, tx + 0x200, (f.len() - 8) as u32, 0, 0);
    a.push_avail(1, 100);
    a.kick(1);
    wait_until("delivery", || b.used_idx(0) == 1);
    assert_eq!(b.pop_used(0), Some((50, (12 + f.len()) as u32)));
    let read = |addr: u64, len: usize| {
        let mut v = vec![0u8; len];
        vm_memory::Bytes::read_slice(&b.mem, &mut v, vm_memory::GuestAddress(addr)).unwrap();
        v
    };
    let mut want_hdr = vec![0u8; 12];
    want_hdr[10] = 1;
    assert_eq!(read(rx, 12), want_hdr);
    let mut got = read(rx + 0x100, 5);
    got.extend(read(rx + 0x200, f.len() - 5));
    assert_eq!(got, f);
    assert_eq!(port_stat(&p, 0, "tx_frames"), 1);
}

#[test]
fn a_stopped_receive_queue_is_not_written_and_drops_count_as_down() {
    use vhost::vhost_user::VhostUserFrontend;
    let p = spawn_switch(&[A, B], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    // The VMM stops B's receive ring (device reset, or before migration).
    vhost::VhostBackend::get_vring_base(&b.fe, 0).unwrap();
    b.fe.set_vring_enable(0, false).unwrap();
    let used_before = b.used_idx(0);
    a.send(&frame(B, A, b"to a stopped ring"));
    a.wait_tx_done();
    wait_until("the drop", || port_stat(&p, 1, "dropped_down") == 1);
    assert_eq!(b.used_idx(0), used_before, "a stopped ring is not written");
    assert_eq!(stats(&p)["ports"][1]["rx_ready"], false);
}

#[test]
fn a_guest_writing_garbage_into_its_rings_hurts_only_itself() {
    let mut p = spawn_switch(&[A, B, C], &[]);
    let mut a = attach(&p, 0, 16);
    let mut b = attach(&p, 1, 16);
    let mut c = attach(&p, 2, 16);
    // xorshift: deterministic garbage.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..200 {
        for q in 0..2 {
            for id in 0..8u16 {
                let r = rnd();
                // Addresses inside and far outside guest memory, any length,
                // any flags, any next.
                let addr = if r & 1 == 0 { r >> 44 } else { r >> 8 };
                a.put_desc(
                    q,
                    id,
                    addr,
                    (r >> 16) as u32 % 4096,
                    (r >> 32) as u16 & 7,
                    (r >> 48) as u16,
                );
                a.push_avail(q, (rnd() % 300) as u16);
            }
            a.kick(q);
        }
        if round % 10 == 0 {
            // Meanwhile B and C keep talking, and B's broadcasts are
            // delivered into A's garbage receive ring.
            let f = seq_frame(BROADCAST, B, round, 100);
            b.send(&f);
            assert_eq!(c.recv(), f);
        }
    }
    assert!(p.is_running(), "part-io survived: {}", p.log());
    let s = stats(&p);
    let malformed: u64 = s["ports"][0]["malformed"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let bad = malformed + s["ports"][0]["tx_bad_frame"].as_u64().unwrap();
    assert!(bad > 0, "garbage was noticed: {s}");
    let f = frame(B, C, b"still fine");
    c.send(&f);
    assert_eq!(b.recv(), f);
}
