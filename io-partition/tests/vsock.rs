//! `part-io vsock` driven by test-side frontends: three "guests" (CIDs 3, 4
//! and 5; 4 accepts 3 and 5 on port 80, 3 accepts 5 on port 90, nobody
//! else is accepted) with their rx and tx queues in sealed memfds.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::net::{stats, NetDevice};
use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress};

const HDR_LEN: usize = 44;
const RX_BUF: u32 = 2048;
/// Receive buffers of the test frontend (`common::net` ring layout).
const RX_BUFS: u64 = 0x10_0000;
const RX_STRIDE: u64 = 2048;
/// Transmit buffers: our own area, 64 KiB apart.
const TX_BUFS: u64 = 0x30_0000;
const TX_STRIDE: u64 = 0x1_0000;
const QUIET: Duration = Duration::from_millis(200);

const REQUEST: u16 = 1;
const RESPONSE: u16 = 2;
const RST: u16 = 3;
const RW: u16 = 5;
const CREDIT_UPDATE: u16 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hdr {
    src: (u64, u32),
    dst: (u64, u32),
    len: u32,
    op: u16,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn new(op: u16, src: (u64, u32), dst: (u64, u32)) -> Hdr {
        Hdr {
            src,
            dst,
            len: 0,
            op,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src.0.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.src.1.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst.1.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&1u16.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Hdr {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([b[28], b[29]]), 1, "stream type");
        Hdr {
            src: (u64_at(0), u32_at(16)),
            dst: (u64_at(8), u32_at(20)),
            len: u32_at(24),
            op: u16::from_le_bytes([b[30], b[31]]),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

struct Guest {
    dev: NetDevice,
    next_tx: u16,
}

impl Guest {
    /// Connects to port `i`, posts 16 receive buffers of [`RX_BUF`] bytes.
    fn attach(p: &PartIo, i: usize) -> Guest {
        let mut dev = NetDevice::connect(
            &p.dir.path().join(format!("p{i}.sock")),
            guest_memory(SEALED),
            16,
            false,
        )
        .unwrap();
        for id in 0..16 {
            dev.post_rx_len(id, RX_BUF);
        }
        dev.kick(0);
        Guest { dev, next_tx: 0 }
    }

    fn config_cid(&mut self) -> u64 {
        let (_, payload) = self
            .dev
            .fe
            .get_config(
                0,
                8,
                vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                &[0; 8],
            )
            .unwrap();
        u64::from_le_bytes(payload.try_into().unwrap())
    }

    /// Sends `h` (with `payload`, whose length goes into `h.len` unless
    /// `len` overrides it) in one descriptor.
    fn send_raw(&mut self, mut h: Hdr, payload: &[u8], len: Option<u32>) {
        h.len = len.unwrap_or(payload.len() as u32);
        while self.dev.pop_used(1).is_some() {}
        let id = self.next_tx % 16;
        self.next_tx += 1;
        let addr = TX_BUFS + u64::from(id) * TX_STRIDE;
        self.dev
            .mem
            .write_slice(&h.encode(), GuestAddress(addr))
            .unwrap();
        self.dev
            .mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.dev
            .put_desc(1, id, addr, (HDR_LEN + payload.len()) as u32, 0, 0);
        self.dev.push_avail(1, id);
        self.dev.kick(1);
    }

    fn send(&mut self, h: Hdr, payload: &[u8]) {
        self.send_raw(h, payload, None);
    }

    /// The next received packet within `timeout`; reposts its buffer.
    fn recv_timeout(&mut self, timeout: Duration) -> Option<(Hdr, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((id, len)) = self.dev.pop_used(0) {
                assert!(len as usize >= HDR_LEN, "used length {len}");
                let mut buf = vec![0u8; len as usize];
                self.dev
                    .mem
                    .read_slice(&mut buf, GuestAddress(RX_BUFS + u64::from(id) * RX_STRIDE))
                    .unwrap();
                let h = Hdr::decode(&buf);
                assert_eq!(
                    h.len as usize,
                    len as usize - HDR_LEN,
                    "used length = 44 + len"
                );
                self.dev.post_rx_len(id, RX_BUF);
                self.dev.kick(0);
                return Some((h, buf.split_off(HDR_LEN)));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn recv(&mut self) -> (Hdr, Vec<u8>) {
        self.recv_timeout(TIMEOUT).expect("no packet received")
    }

    fn expect_nothing(&mut self) {
        if let Some(p) = self.recv_timeout(QUIET) {
            panic!("unexpected packet {:?}", p.0);
        }
    }
}

fn spawn_relay() -> PartIo {
    let dir = tempfile::tempdir().unwrap();
    let port = |i: usize, rest: &str| {
        format!(
            "socket={},{rest}",
            dir.path().join(format!("p{i}.sock")).display()
        )
    };
    let args = vec![
        "vsock".to_string(),
        "--port".into(),
        port(0, "cid=3,accept=5:90"),
        "--port".into(),
        port(1, "cid=4,accept=3:80+5:80"),
        "--port".into(),
        port(2, "cid=5"),
        "--stats-socket".into(),
        dir.path().join("stats.sock").display().to_string(),
    ];
    PartIo::spawn_args(dir, &args, 3)
}

/// Three attached guests whose receive queues the relay knows.
fn three_guests(p: &PartIo) -> (Guest, Guest, Guest) {
    let g = (
        Guest::attach(p, 0),
        Guest::attach(p, 1),
        Guest::attach(p, 2),
    );
    let deadline = Instant::now() + TIMEOUT;
    while p.log().matches("vsock receive queue ready").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "receive queues never ready:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    g
}

const A: (u64, u32) = (3, 1025);
const B: (u64, u32) = (4, 80);

/// Opens A -> B:80 and checks both sides of the handshake.
fn connect(a: &mut Guest, b: &mut Guest) {
    a.send(Hdr::new(REQUEST, A, B), &[]);
    let (h, _) = b.recv();
    assert_eq!(h, Hdr::new(REQUEST, A, B));
    b.send(Hdr::new(RESPONSE, B, A), &[]);
    let (h, _) = a.recv();
    assert_eq!(h, Hdr::new(RESPONSE, B, A));
}

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

/// Counter `name` of the port with CID `cid`.
fn stat(p: &PartIo, cid: u64, name: &str) -> u64 {
    let s = stats(p);
    let port = s["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["cid"] == cid)
        .unwrap()
        .clone();
    port[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {port}"))
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
    let chunk = pattern(3, 16_000);
    let t0 = Instant::now();
    let (mut sent, mut got, mut credit_fwd) = (0usize, 0usize, 0u32);
    while got < total {
        // Send while A's advertised 65536 bytes allow.
        while sent < total && sent - credit_fwd as usize + chunk.len() <= 65_536 {
            c.send(Hdr::new(RW, from, to), &chunk);
            sent += chunk.len();
        }
        let (h, payload) = a.recv();
        assert_eq!((h.op, h.src, h.dst), (RW, from, to));
        let at = got % chunk.len();
        assert_eq!(
            payload[..],
            chunk[at..at + payload.len()],
            "stream content at {got}"
        );
        got += payload.len();
        if got - credit_fwd as usize >= 32_000 {
            let mut update = Hdr::new(CREDIT_UPDATE, to, from);
            update.fwd_cnt = got as u32;
            a.send(update, &[]);
            // C may use the new credit once it has seen the update, as a
            // guest does: sending on an update still in flight would be
            // sending past the credit part-io knows of.
            let (h, _) = c.recv();
            assert_eq!((h.op, h.fwd_cnt), (CREDIT_UPDATE, got as u32));
            credit_fwd = h.fwd_cnt;
        }
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
    // A descriptor outside guest memory, a loop, a too-short header, a
    // device-writable tx buffer and a header that claims more payload than
    // it has.
    a.dev.put_desc(1, 0, (MEM_SIZE as u64) + 0x1000, 64, 0, 0);
    a.dev.push_avail(1, 0);
    a.dev.put_desc(1, 1, TX_BUFS, 44, NEXT, 2);
    a.dev.put_desc(1, 2, TX_BUFS, 44, NEXT, 1);
    a.dev.push_avail(1, 1);
    a.dev.put_desc(1, 3, TX_BUFS, 20, 0, 0);
    a.dev.push_avail(1, 3);
    a.dev.put_desc(1, 4, TX_BUFS, 44, WRITE, 0);
    a.dev.push_avail(1, 4);
    let mut liar = Hdr::new(RW, A, B);
    liar.len = 5000;
    a.dev
        .mem
        .write_slice(&liar.encode(), GuestAddress(TX_BUFS + 0x8000))
        .unwrap();
    a.dev.put_desc(1, 5, TX_BUFS + 0x8000, 44 + 10, 0, 0);
    a.dev.push_avail(1, 5);
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
