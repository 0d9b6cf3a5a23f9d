//! The test guest's frame format, receiver accounting and `net=` words,
//! from the host crate (the same source files the guest compiles).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use partvisor_test_guest::fnv1a64;
use partvisor_test_guest::net_frame::{
    build, ethertype, parse, parse_mac, Kind, Mac, NotOurs, SeqTracker, ETHERTYPE, MAX_LEN, MIN_LEN,
};
use partvisor_test_guest::words::{parse_net, NetWord, DEFAULT_WINDOW};

const A: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0b];

fn frame(kind: Kind, seq: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_LEN];
    assert_eq!(build(&mut buf, B, A, kind, seq, len), Some(len));
    buf.truncate(len);
    buf
}

#[test]
fn built_frames_have_the_documented_layout() {
    let f = frame(Kind::Data, 0x0102_0304_0506_0708, 100);
    assert_eq!(&f[0..6], &B, "destination");
    assert_eq!(&f[6..12], &A, "source");
    assert_eq!(&f[12..14], &[0x88, 0xb5], "ethertype, big-endian");
    assert_eq!(ethertype(&f), ETHERTYPE);
    assert_eq!(&f[14..18], b"PVNF");
    assert_eq!(f[18], 1, "kind data");
    assert_eq!(f[19], 0);
    assert_eq!(&f[20..22], &100u16.to_le_bytes());
    assert_eq!(&f[22..24], &[0, 0]);
    assert_eq!(&f[24..32], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&f[92..100], &fnv1a64(&f[14..92]).to_le_bytes());
    // Pinned, so guests and host tools built at different times agree.
    assert_eq!(fnv1a64(&frame(Kind::Data, 7, 60)), 0x1895_b798_90f7_dfda); // from an independent Python model
}

#[test]
fn parse_round_trips_every_kind_and_length_bound() {
    for kind in Kind::ALL {
        for len in [MIN_LEN, 64, 1000, MAX_LEN] {
            let f = parse(&frame(kind, 42, len)).unwrap();
            assert_eq!((f.dst, f.src, f.kind, f.seq, f.len), (B, A, kind, 42, len));
            assert!(f.intact, "{kind:?} {len}");
        }
    }
    let mut buf = [0u8; MAX_LEN + 1];
    assert_eq!(build(&mut buf, B, A, Kind::Data, 0, MIN_LEN - 1), None);
    assert_eq!(build(&mut buf, B, A, Kind::Data, 0, MAX_LEN + 1), None);
    assert_eq!(build(&mut buf[..100], B, A, Kind::Data, 0, 101), None);
}

#[test]
fn any_changed_payload_byte_makes_the_frame_not_intact() {
    let good = frame(Kind::Data, 9, 200);
    for at in (14..200).filter(|&i| !(18..=21).contains(&i)) {
        let mut f = good.clone();
        f[at] ^= 0x01;
        match parse(&f) {
            Ok(p) => assert!(!p.intact, "byte {at}"),
            Err(e) => assert_eq!(e, NotOurs::Header, "byte {at}"),
        }
    }
    // A rewritten source MAC is not damage (the checksum starts at byte 14).
    let mut f = good.clone();
    f[6] ^= 0xff;
    assert!(parse(&f).unwrap().intact);
}

#[test]
fn foreign_frames_are_told_apart_from_damaged_ones() {
    let mut f = frame(Kind::Ack, 1, 64);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    assert_eq!(parse(&f), Err(NotOurs::Ethertype(0x0800)));
    let mut f = frame(Kind::Ack, 1, 64);
    f[14] = b'X';
    assert_eq!(parse(&f), Err(NotOurs::Header));
    let mut f = frame(Kind::Ack, 1, 64);
    f[18] = 99;
    assert_eq!(parse(&f), Err(NotOurs::Header), "unknown kind");
    let f = frame(Kind::Ack, 1, 64);
    assert_eq!(
        parse(&f[..63]),
        Err(NotOurs::Header),
        "length field disagrees"
    );
    assert_eq!(parse(&f[..59]), Err(NotOurs::Length));
}

#[test]
fn macs_parse_and_print_in_colon_form() {
    assert_eq!(parse_mac("52:54:00:12:34:56"), Some(A));
    assert_eq!(parse_mac("52-54-00-12-34-56"), Some(A));
    assert_eq!(Mac(A).to_string(), "52:54:00:12:34:56");
    for bad in [
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "5:54:00:12:34:56",
        "zz:54:00:12:34:56",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad}");
    }
}

#[test]
fn tracker_counts_loss_damage_and_duplicates() {
    let mut t = SeqTracker::new(10);
    for seq in [0, 1, 2] {
        t.on_data(seq, true);
    }
    assert!(t.perfect() || !t.done());
    t.on_data(5, true); // 3 and 4 lost
    t.on_data(4, true); // late: counted as a duplicate, not un-lost
    t.on_data(6, false); // damaged, but the next number: takes its place
    t.on_data(2, true); // duplicate
    t.on_data(12, true); // beyond the expected range
    assert_eq!(
        (t.next, t.ok, t.lost, t.bad, t.dup),
        (7, 4, 2, 2, 2),
        "{t:?}"
    );
    assert!(!t.done() && !t.perfect());
    for seq in 7..10 {
        t.on_data(seq, true);
    }
    assert!(t.done() && !t.perfect());

    let mut clean = SeqTracker::new(3);
    for seq in 0..3 {
        clean.on_data(seq, true);
    }
    assert!(clean.done() && clean.perfect());
}

#[test]
fn net_words_parse_and_reject_garbage() {
    let w = |s: &str| parse_net(s);
    assert_eq!(w("mac"), Some(NetWord::Mac));
    assert_eq!(w("bad-tx"), Some(NetWord::BadTx));
    assert_eq!(w("use:1"), Some(NetWord::Use { index: 1 }));
    assert_eq!(
        w("send:52:54:00:12:34:56:10000:1514"),
        Some(NetWord::Send {
            peer: A,
            frames: 10000,
            size: 1514,
            window: DEFAULT_WINDOW
        })
    );
    assert_eq!(
        w("send:52-54-00-12-34-56:5:60:8"),
        Some(NetWord::Send {
            peer: A,
            frames: 5,
            size: 60,
            window: 8
        })
    );
    assert_eq!(
        w("recv:100"),
        Some(NetWord::Recv {
            frames: 100,
            delay_us: 0
        })
    );
    assert_eq!(
        w("recv:100:2000"),
        Some(NetWord::Recv {
            frames: 100,
            delay_us: 2000
        })
    );
    assert_eq!(w("expect-none:500"), Some(NetWord::ExpectNone { ms: 500 }));
    assert_eq!(w("spoof:3"), Some(NetWord::Spoof { frames: 3 }));
    assert_eq!(
        w("ping:52:54:00:12:34:56:7"),
        Some(NetWord::Ping { peer: A, rounds: 7 })
    );
    assert_eq!(w("pong:7"), Some(NetWord::Pong { rounds: 7 }));
    assert_eq!(
        w("recv-any:2"),
        Some(NetWord::RecvAny {
            frames: 2,
            ethertype: None
        })
    );
    assert_eq!(
        w("recv-any:2:0x88b5"),
        Some(NetWord::RecvAny {
            frames: 2,
            ethertype: Some(0x88b5)
        })
    );
    assert_eq!(
        w("recv-any:1:2048"),
        Some(NetWord::RecvAny {
            frames: 1,
            ethertype: Some(0x0800)
        })
    );
    assert_eq!(w("broadcast:4"), Some(NetWord::Broadcast { frames: 4 }));
    for bad in [
        "",
        "mac:1",
        "bad-tx:1",
        "send:52:54:00:12:34:56:10",
        "send:52:54:00:12:34:56:10:59",
        "send:52:54:00:12:34:56:10:1515",
        "send:52:54:00:12:34:56:10:100:0",
        "send:52:54:00:12:34:56:10:100:129",
        "send:52:54:00:12:34:10:100",
        "recv",
        "recv:1:2:3",
        "recv:1:1000001",
        "expect-none:600001",
        "ping:52:54:00:12:34:56",
        "pong",
        "spoof:x",
        "broadcast:1:2",
        "recv-any:1:0x10000",
        "recv-any:1:x",
        "recv-any:1:0x88b5:1",
        "flood:1",
    ] {
        assert_eq!(w(bad), None, "{bad}");
    }
}
