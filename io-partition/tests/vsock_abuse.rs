//! One guest that misbehaves in every way it can (malformed chains,
//! request floods, credit lies), round after round, while another guest
//! streams through the same `part-io vsock`: the stream stays intact and
//! every kind is counted against the one that did it.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::net::stats;
use common::vsock::*;
use common::*;

/// Posts `chains` (head id, header, payload) on A's transmit ring, kicks
/// once and waits until every head is back.
fn post_and_settle(a: &mut Guest, chains: &[(u16, Hdr, &[u8])]) {
    for (id, h, payload) in chains {
        a.post(*id, *h, payload, None);
    }
    a.dev.kick(1);
    settle(a, chains.len());
}

/// Waits until `n` transmit chains of A are back.
fn settle(a: &mut Guest, n: usize) {
    let deadline = Instant::now() + TIMEOUT;
    let mut back = 0;
    while back < n {
        if a.dev.pop_used(1).is_some() {
            back += 1;
        } else {
            assert!(Instant::now() < deadline, "{back} of {n} chains back");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// One round of everything guest A can do wrong: five malformed chains, a
/// flood of requests nobody accepts, and a connection to B on which it
/// sends past B's credit.
fn abuse_round(a: &mut Guest, round: u32) {
    post_malformed_chains(a, TX_BUFS + 5 * TX_STRIDE);
    a.dev.kick(1);
    settle(a, 5);
    // 12 requests to C, which accepts nobody: 12 RSTs back to A.
    let flood: Vec<(u16, Hdr, &[u8])> = (0..12u16)
        .map(|i| {
            let from = (3, 40_000 + u32::from(i));
            (i, Hdr::new(REQUEST, from, (5, 1)), &[][..])
        })
        .collect();
    post_and_settle(a, &flood);
    for _ in 0..12 {
        assert_eq!(a.recv().0.op, RST);
    }
    // A credit liar: 65537 bytes against B's 65536.
    let me = (3, 50_000 + round);
    post_and_settle(a, &[(0, Hdr::new(REQUEST, me, B), &[])]);
    let (h, _) = a.recv();
    assert_eq!((h.op, h.dst), (RESPONSE, me), "{h:?}");
    let big = vec![7u8; 65_437];
    post_and_settle(
        a,
        &[
            (0, Hdr::new(RW, me, B), &[1u8; 100][..]),
            (1, Hdr::new(RW, me, B), &big[..]),
        ],
    );
    let (h, _) = a.recv();
    assert_eq!((h.op, h.dst), (RST, me), "{h:?}");
}

/// Streams `total` bytes (a multiple of 16000) from C to B:80 in
/// 16000-byte packets, B reading, checking every byte and returning credit.
/// B also answers A's connection requests as an accepting listener would,
/// and skips A's other packets. Returns the rate in MB/s.
fn stream_c_to_b(b: &mut Guest, c: &mut Guest, total: usize) -> f64 {
    let (from, to) = ((5, 3001), B);
    c.send(Hdr::new(REQUEST, from, to), &[]);
    let mut stream = Stream::new(from, to, 5, total);
    let mut t0 = Instant::now();
    let mut open = false;
    while !stream.done() {
        if open {
            stream.send(c);
        }
        let (h, payload) = b.recv();
        if h.src.0 == 3 {
            // A: accept its requests; its data and resets are its own.
            if h.op == REQUEST {
                b.send(Hdr::new(RESPONSE, B, h.src), &[]);
            }
            continue;
        }
        assert_eq!((h.src, h.dst), (from, to), "{h:?}");
        if h.op == RST && !open {
            // The end of an earlier stream between the same ports.
            continue;
        }
        if h.op == REQUEST {
            b.send(Hdr::new(RESPONSE, to, from), &[]);
            assert_eq!(c.recv().0.op, RESPONSE);
            open = true;
            t0 = Instant::now();
            continue;
        }
        assert_eq!(h.op, RW, "{h:?}");
        stream.take(b, c, &payload);
    }
    let rate = total as f64 / t0.elapsed().as_secs_f64() / 1e6;
    c.send(Hdr::new(RST, from, to), &[]);
    rate
}

#[test]
fn one_guests_malformed_chains_flood_and_credit_lies_leave_anothers_stream_intact() {
    let p = spawn_relay();
    let (mut a, mut b, mut c) = three_guests(&p);
    let total = 256 * 16_000;
    let alone = stream_c_to_b(&mut b, &mut c, total);
    // A misbehaves in every way it can, over and over, while C streams to B.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let abuser = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                abuse_round(&mut a, rounds);
                rounds += 1;
            }
            rounds
        })
    };
    // Let A's first round begin before the stream.
    std::thread::sleep(Duration::from_millis(20));
    let during = stream_c_to_b(&mut b, &mut c, total);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // B keeps answering A's last requests until A's round is over.
    let deadline = Instant::now() + TIMEOUT;
    while !abuser.is_finished() {
        assert!(Instant::now() < deadline, "A's round never ended");
        if let Some((h, _)) = b.recv_timeout(Duration::from_millis(5)) {
            if h.op == REQUEST {
                b.send(Hdr::new(RESPONSE, B, h.src), &[]);
            }
        }
    }
    let rounds = abuser.join().unwrap();
    eprintln!(
        "C -> B through part-io vsock: {alone:.0} MB/s alone, {during:.0} MB/s while A ran \
         {rounds} rounds of malformed chains, request floods and credit lies"
    );
    assert!(rounds >= 1, "A never finished a round");
    let r = u64::from(rounds);
    // Every kind is counted against A, each round.
    assert!(stat(&p, 3, "bad_address") >= r);
    assert!(stat(&p, 3, "loop") >= r);
    assert!(stat(&p, 3, "bad_buffer") >= 3 * r);
    assert!(stat(&p, 3, "refused") >= 12 * r);
    assert!(stat(&p, 3, "credit_violations") >= r);
    // And nothing against C or B.
    for cid in [4, 5] {
        for k in [
            "bad_address",
            "loop",
            "bad_buffer",
            "refused",
            "credit_violations",
            "bad_header",
        ] {
            assert_eq!(stat(&p, cid, k), 0, "{k} of CID {cid}: {}", stats(&p));
        }
    }
}
