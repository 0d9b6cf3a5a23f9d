//! `part-io vsock` driven by test-side frontends: three "guests" (CIDs 3, 4
//! and 5; 4 accepts 3 and 5 on port 80, 3 accepts 5 on port 90, nobody
//! else is accepted) with their rx and tx queues in sealed memfds.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::net::stats;
use common::vsock::*;
use common::*;

#[test]
fn config_space_carries_each_partitions_cid() {
    let p = spawn_relay();
    let (mut a, mut b, mut c) = three_guests(&p);
    assert_eq!((a.config_cid(), b.config_cid(), c.config_cid()), (3, 4, 5));
}

#[test]
fn an_accepted_connection_carries_data_split_across_receive_buffers_intact() {
    let p = spawn_relay();
    let (mut a, mut b, _c) = three_guests(&p);
    connect(&mut a, &mut b);
    let data = pattern(7, 10_000);
    a.send(Hdr::new(RW, A, B), &data);
    let mut got = Vec::new();
    let mut packets = 0;
    while got.len() < data.len() {
        let (h, payload) = b.recv();
        assert_eq!((h.op, h.src, h.dst), (RW, A, B));
        assert!(h.len as usize <= RX_BUF as usize - HDR_LEN);
        got.extend_from_slice(&payload);
        packets += 1;
    }
    assert_eq!(got, data);
    assert_eq!(packets, 5, "10000 bytes in 2004-byte buffers");
    // And back, after B tells A it consumed everything.
    let mut back = Hdr::new(RW, B, A);
    back.fwd_cnt = 10_000;
    b.send(back, b"pong");
    let (h, payload) = a.recv();
    assert_eq!(
        (h.op, h.fwd_cnt, payload.as_slice()),
        (RW, 10_000, &b"pong"[..])
    );
}

const C_TO_A: ((u64, u32), (u64, u32)) = ((5, 3000), (3, 90));

/// Resident memory of the part-io process.
fn rss_kib(p: &PartIo) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Streams `total` bytes (a multiple of 16000) from C to A:90 in 16000-byte packets, A reading
/// and returning credit as it goes; returns the rate in MB/s.
fn stream_c_to_a(a: &mut Guest, c: &mut Guest, total: usize) -> f64 {
    let (from, to) = C_TO_A;
    c.send(Hdr::new(REQUEST, from, to), &[]);
    assert_eq!(a.recv().0.op, REQUEST);
    a.send(Hdr::new(RESPONSE, to, from), &[]);
    assert_eq!(c.recv().0.op, RESPONSE);
    let mut stream = Stream::new(from, to, 3, total);
    let t0 = Instant::now();
    while !stream.done() {
        stream.send(c);
        let (h, payload) = a.recv();
        assert_eq!((h.op, h.src, h.dst), (RW, from, to));
        stream.take(a, c, &payload);
    }
    total as f64 / t0.elapsed().as_secs_f64() / 1e6
}

#[test]
fn a_receiver_that_stops_reading_stalls_only_its_own_connection() {
    let p = spawn_relay();
    let (mut a, mut b, mut c) = three_guests(&p);
    let baseline = stream_c_to_a(&mut a, &mut c, 128 * 16_000);
    let rss_before = rss_kib(&p);
    // A -> B with B not reading: A sends the 64000 bytes B's credit allows.
    connect(&mut a, &mut b);
    let data = pattern(9, 64_000);
    for part in data.chunks(16_000) {
        a.send(Hdr::new(RW, A, B), part);
    }
    // Each 16000-byte packet takes 8 of B's 2004-byte buffers, so B's 16
    // buffers hold two packets; the other two wait in part-io.
    let per_packet = 16_000u64.div_ceil(RX_BUF as u64 - HDR_LEN as u64);
    let want_queued = 64_000 - (16 / per_packet) * 16_000;
    assert_eq!(want_queued, 32_000);
    let deadline = Instant::now() + TIMEOUT;
    while stat(&p, 4, "queued_bytes") != want_queued {
        assert!(
            Instant::now() < deadline,
            "queued {}",
            stat(&p, 4, "queued_bytes")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Meanwhile C's stream to A runs as before.
    let (from, to) = C_TO_A;
    c.send(Hdr::new(RST, from, to), &[]);
    assert_eq!(a.recv().0.op, RST);
    let stalled = stream_c_to_a(&mut a, &mut c, 128 * 16_000);
    eprintln!(
        "C -> A through part-io vsock: {baseline:.0} MB/s alone, {stalled:.0} MB/s while A -> B \
         is stalled on B ({want_queued} bytes queued for B, bounded by B's credit)"
    );
    let rss_after = rss_kib(&p);
    eprintln!("part-io RSS {rss_before} KiB before the stall, {rss_after} KiB with it");
    assert!(
        rss_after < rss_before + 4096,
        "part-io grew from {rss_before} to {rss_after} KiB"
    );
    // B reads at last: everything arrives, in order.
    let mut got = Vec::new();
    while got.len() < data.len() {
        let (h, payload) = b.recv();
        assert_eq!((h.op, h.src, h.dst), (RW, A, B));
        got.extend_from_slice(&payload);
    }
    assert_eq!(got, data);
    assert_eq!(stat(&p, 4, "queued_bytes"), 0);
    assert_eq!(stat(&p, 3, "credit_violations"), 0);
}

#[test]
fn a_request_flood_is_cut_at_the_limit_and_others_still_connect() {
    let p = spawn_relay();
    let (mut a, mut b, mut c) = three_guests(&p);
    for port in 0..100u32 {
        a.send(Hdr::new(REQUEST, (3, 10_000 + port), B), &[]);
        if port % 8 == 7 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut resets = 0;
    while let Some((h, _)) = a.recv_timeout(QUIET) {
        assert_eq!(h.op, RST);
        resets += 1;
    }
    assert_eq!(
        resets, 36,
        "requests past the 64-connection limit are reset"
    );
    assert_eq!(stat(&p, 3, "refused"), 36);
    assert_eq!(stat(&p, 3, "lookups"), 64);
    // B sees the 64 it can have; C still reaches B.
    let mut requests = 0;
    while let Some((h, _)) = b.recv_timeout(QUIET) {
        assert_eq!((h.op, h.src.0), (REQUEST, 3));
        requests += 1;
    }
    assert_eq!(requests, 64);
    let from_c = (5, 1);
    c.send(Hdr::new(REQUEST, from_c, B), &[]);
    assert_eq!(b.recv().0, Hdr::new(REQUEST, from_c, B));
    assert_eq!(stat(&p, 5, "refused"), 0);
}

#[test]
fn malformed_chains_are_counted_and_hurt_only_their_sender() {
    let p = spawn_relay();
    let (mut a, mut b, mut c) = three_guests(&p);
    post_malformed_chains(&mut a, TX_BUFS + 0x8000);
    a.dev.kick(1);
    let deadline = Instant::now() + TIMEOUT;
    while stat(&p, 3, "bad_buffer") < 3 {
        assert!(Instant::now() < deadline, "{}", stats(&p));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stat(&p, 3, "bad_address"), 1);
    assert_eq!(stat(&p, 3, "loop"), 1);
    assert_eq!(stat(&p, 3, "bad_buffer"), 3);
    // Every chain went back to A (used length 0), and C's traffic to B is
    // untouched.
    let mut used = 0;
    while a.dev.pop_used(1).is_some() {
        used += 1;
    }
    assert_eq!(used, 5);
    let from_c = (5, 7);
    c.send(Hdr::new(REQUEST, from_c, B), &[]);
    assert_eq!(b.recv().0.op, REQUEST);
    b.send(Hdr::new(RESPONSE, B, from_c), &[]);
    assert_eq!(c.recv().0.op, RESPONSE);
    c.send(Hdr::new(RW, from_c, B), b"intact");
    assert_eq!(b.recv().1, b"intact");
    assert_eq!(stat(&p, 5, "bad_buffer") + stat(&p, 4, "bad_buffer"), 0);
}

#[test]
fn a_partition_not_accepted_gets_a_reset_and_the_listener_sees_nothing() {
    let p = spawn_relay();
    let (_a, mut b, mut c) = three_guests(&p);
    // B accepts C on port 80 only.
    let (from_c, b81) = ((5, 2000), (4, 81));
    c.send(Hdr::new(REQUEST, from_c, b81), &[]);
    let (h, _) = c.recv();
    assert_eq!((h.op, h.src, h.dst), (RST, b81, from_c));
    b.expect_nothing();
    p.wait_log("refused: the listener's definition does not accept this partition");
}

#[test]
fn a_spoofed_source_cid_is_not_delivered() {
    let p = spawn_relay();
    let (_a, mut b, mut c) = three_guests(&p);
    // C pretends to be A, who is accepted.
    c.send(Hdr::new(REQUEST, A, B), &[]);
    b.expect_nothing();
    c.expect_nothing();
    p.wait_log("source CID 3 is not the partition's CID 5");
}

#[test]
fn a_credit_liar_loses_its_connection_at_both_ends() {
    let p = spawn_relay();
    let (mut a, mut b, _c) = three_guests(&p);
    connect(&mut a, &mut b);
    // B advertised 65536 bytes; A sends 65537 in two packets.
    a.send_raw(Hdr::new(RW, A, B), &[1u8; 100], Some(100));
    let mut got = 0;
    while got < 100 {
        got += b.recv().1.len();
    }
    a.send_raw(Hdr::new(RW, A, B), &vec![2u8; 65_437], None);
    let (h, _) = a.recv();
    assert_eq!((h.op, h.src, h.dst), (RST, B, A));
    let (h, _) = b.recv();
    assert_eq!((h.op, h.src, h.dst), (RST, A, B));
    p.wait_log("credit rule broken: sent 65437 bytes with only 65436 bytes of credit");
}

#[test]
fn a_listener_without_a_receive_queue_gets_no_half_open_connection() {
    let p = spawn_relay();
    // B (CID 4) is not attached: its device has no receive queue.
    let mut a = Guest::attach(&p, 0);
    let deadline = Instant::now() + TIMEOUT;
    while !p.log().contains("vsock receive queue ready") {
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    a.send(Hdr::new(REQUEST, A, B), &[]);
    let (h, _) = a.recv();
    assert_eq!(
        (h.op, h.src, h.dst),
        (RST, B, A),
        "refused at once, not after a timeout"
    );
    assert_eq!(stat(&p, 3, "open"), 0);
}

#[test]
fn when_a_partition_goes_its_peers_are_reset_within_a_second() {
    let p = spawn_relay();
    let (mut a, mut b, _c) = three_guests(&p);
    connect(&mut a, &mut b);
    let t0 = Instant::now();
    drop(b);
    let (h, _) = a
        .recv_timeout(Duration::from_secs(1))
        .expect("no reset within a second of the listener going");
    assert_eq!((h.op, h.src, h.dst), (RST, B, A));
    eprintln!("reset after {:?}", t0.elapsed());
}
