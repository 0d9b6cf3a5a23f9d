//! Hybrid vsock (Firecracker's `uds_path` protocol): host processes and a
//! test-side guest (CID 3) reach each other through the partition's host
//! socket, both ways, and what either side does wrong is refused, counted
//! and harms only that connection.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::net::stats;
use common::vsock::*;
use common::*;

const G: u64 = 3;
/// `HOST_BUF` of part-io: the buffer it advertises for the host end.
const HOST_BUF: u32 = 256 * 1024;
const FIRST_HOST_PORT: u32 = 1 << 30;

fn spawn_hybrid() -> PartIo {
    let dir = tempfile::tempdir().unwrap();
    let args = vec![
        "vsock".to_string(),
        "--port".into(),
        format!(
            "socket={},cid=3,uds={}",
            dir.path().join("p0.sock").display(),
            dir.path().join("host.sock").display()
        ),
        "--stats-socket".into(),
        dir.path().join("stats.sock").display().to_string(),
    ];
    PartIo::spawn_args(dir, &args, 1)
}

fn host_socket(p: &PartIo) -> PathBuf {
    p.dir.path().join("host.sock")
}

/// A host service listening where a guest's connection to host port
/// `port` goes: `<host socket>_<port>`.
fn host_listener(p: &PartIo, port: u32) -> UnixListener {
    UnixListener::bind(format!("{}_{port}", host_socket(p).display())).unwrap()
}

fn guest(p: &PartIo) -> Guest {
    let g = Guest::attach(p, 0);
    let deadline = Instant::now() + TIMEOUT;
    while !p.log().contains("vsock receive queue ready") {
        assert!(Instant::now() < deadline, "no receive queue:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    g
}

fn stat(p: &PartIo, name: &str) -> u64 {
    stats(p)["ports"][0][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// Waits until counter `name` reaches `want`.
fn wait_stat(p: &PartIo, name: &str, want: u64) {
    let deadline = Instant::now() + TIMEOUT;
    while stat(p, name) < want {
        assert!(Instant::now() < deadline, "{name} < {want}: {}", stats(p));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stat(p, name), want, "{}", stats(p));
}

/// Bytes `0..n` of a pattern both sides can check.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Host process side of `CONNECT port`: the stream, still waiting for the
/// answer.
fn host_connect(p: &PartIo, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(host_socket(p)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    s
}

/// Reads the `OK <port>` line.
fn read_ok(s: &mut UnixStream) -> u32 {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let text = String::from_utf8(line).unwrap();
    text.strip_prefix("OK ")
        .unwrap_or_else(|| panic!("answer {text:?}"))
        .parse()
        .unwrap()
}

/// Receives RW packets on connection `conn` until `n` bytes are in,
/// giving credit back as it goes; returns the bytes and the final fwd_cnt.
fn guest_read(g: &mut Guest, conn: ((u64, u32), (u64, u32)), n: usize) -> (Vec<u8>, u32) {
    let (me, peer) = conn;
    let mut got = Vec::new();
    let mut told = 0usize;
    while got.len() < n {
        let (h, payload) = g.recv();
        assert_eq!((h.op, h.src, h.dst), (RW, peer, me), "{h:?}");
        assert_eq!(h.buf_alloc, HOST_BUF);
        got.extend_from_slice(&payload);
        if got.len() - told >= 16 * 1024 {
            let mut u = Hdr::new(CREDIT_UPDATE, me, peer);
            u.fwd_cnt = got.len() as u32;
            g.send(u, &[]);
            told = got.len();
        }
    }
    (got, told as u32)
}

#[test]
fn a_host_process_connects_to_a_guest_port_and_bytes_flow_both_ways() {
    let p = spawn_hybrid();
    let mode = std::fs::metadata(host_socket(&p))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "host socket is owner-only");
    let mut g = guest(&p);
    let mut host = host_connect(&p, 52);

    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst), (REQUEST, (G, 52)), "{h:?}");
    assert_eq!(h.src.0, 2, "from the host CID");
    assert!(h.src.1 >= FIRST_HOST_PORT, "host port {}", h.src.1);
    assert_eq!(h.buf_alloc, HOST_BUF);
    let me = (G, 52);
    let peer = h.src;
    g.send(Hdr::new(RESPONSE, me, peer), &[]);
    assert_eq!(read_ok(&mut host), peer.1, "OK names the host port");

    // Host -> guest, more than the guest's 64 KiB buffer: part-io waits
    // for the guest's credit.
    let out = pattern(200_000, 7);
    let writer = {
        let mut h2 = host.try_clone().unwrap();
        let out = out.clone();
        std::thread::spawn(move || h2.write_all(&out).unwrap())
    };
    let (got, fwd) = guest_read(&mut g, (me, peer), out.len());
    writer.join().unwrap();
    assert!(got == out, "host -> guest bytes differ");

    // Guest -> host: 30 000 bytes leave the guest plenty of room, so part-io
    // sends no credit update; 240 000 leave it less than a packet's worth,
    // and part-io tells it once the host process has read them.
    let back = pattern(240_000, 9);
    let mut rw = Hdr::new(RW, me, peer);
    rw.fwd_cnt = fwd;
    g.send(rw, &back[..30_000]);
    let mut read = vec![0u8; back.len()];
    host.read_exact(&mut read[..30_000]).unwrap();
    g.expect_nothing();
    for chunk in back[30_000..].chunks(60_000) {
        g.send(rw, chunk);
    }
    host.read_exact(&mut read[30_000..]).unwrap();
    assert!(read == back, "guest -> host bytes differ");
    let (h, _) = g.recv();
    assert_eq!(h.op, CREDIT_UPDATE, "{h:?}");
    assert!(h.fwd_cnt > 240_000 - 64 * 1024, "{h:?}");

    // The host process closes: the guest hears a full shutdown, and its
    // RST ends the connection.
    drop(host);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (SHUTDOWN, 3), "{h:?}");
    let mut rst = Hdr::new(RST, me, peer);
    rst.fwd_cnt = fwd;
    g.send(rst, &[]);
    wait_stat(&p, "host_connections", 1);
    let deadline = Instant::now() + TIMEOUT;
    while stat(&p, "host_open") != 0 {
        assert!(Instant::now() < deadline, "{}", stats(&p));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stat(&p, "host_to_guest_bytes"), out.len() as u64);
    assert_eq!(stat(&p, "guest_to_host_bytes"), back.len() as u64);
    assert_eq!(stat(&p, "host_resets"), 0);
}

#[test]
fn a_guest_connects_to_a_host_listener_and_a_missing_listener_is_a_reset() {
    let p = spawn_hybrid();
    let listener = host_listener(&p, 1234);
    let mut g = guest(&p);
    let me = (G, 1025);
    let peer = (2, 1234);

    g.send(Hdr::new(REQUEST, me, peer), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src, h.dst), (RESPONSE, peer, me), "{h:?}");
    assert_eq!(h.buf_alloc, HOST_BUF);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();

    g.send(Hdr::new(RW, me, peer), b"hello from the guest");
    let mut read = [0u8; 20];
    host.read_exact(&mut read).unwrap();
    assert_eq!(&read, b"hello from the guest");
    host.write_all(b"hello from the host").unwrap();
    // No credit update for 20 bytes: the answer itself carries fwd_cnt
    // (20, or 0 if the host answered before part-io's writer counted its
    // write).
    let (h, got) = g.recv();
    assert_eq!(h.op, RW, "{h:?}");
    assert!(h.fwd_cnt == 20 || h.fwd_cnt == 0, "{h:?}");
    assert_eq!(got, b"hello from the host");

    // Nobody listens on port 999: a RST, counted and logged.
    g.send(Hdr::new(REQUEST, (G, 1026), (2, 999)), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src, h.dst), (RST, (2, 999), (G, 1026)), "{h:?}");
    assert_eq!(stat(&p, "host_refused"), 1);
    assert!(p.log().contains("no listener at"), "{}", p.log());

    // The guest closes: the host process reads EOF, the guest gets its RST.
    let mut sd = Hdr::new(SHUTDOWN, me, peer);
    sd.flags = 3;
    sd.fwd_cnt = 19;
    g.send(sd, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src, h.dst), (RST, peer, me), "{h:?}");
    assert_eq!(stat(&p, "host_connections"), 1);
    assert_eq!(stat(&p, "guest_to_host_bytes"), 20);
    assert_eq!(stat(&p, "host_to_guest_bytes"), 19);
}

#[test]
fn bad_lines_refusals_and_silent_guests_close_the_host_stream_and_are_counted() {
    let p = spawn_hybrid();
    let mut g = guest(&p);
    // Closed without an answer (a reset when part-io left bytes unread).
    let closed = |s: &mut UnixStream| {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert!(
            rest.is_empty(),
            "answer {:?}",
            String::from_utf8_lossy(&rest)
        );
    };

    // Not a CONNECT line.
    let mut s = UnixStream::connect(host_socket(&p)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.0\n").unwrap();
    closed(&mut s);
    // A line that never ends.
    let mut s = UnixStream::connect(host_socket(&p)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(&[b'C'; 200]).unwrap();
    closed(&mut s);
    wait_stat(&p, "host_protocol_errors", 2);
    g.expect_nothing();

    // The guest refuses (nothing listens on its port 53).
    let mut s = host_connect(&p, 53);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst), (REQUEST, (G, 53)));
    g.send(Hdr::new(RST, (G, 53), h.src), &[]);
    closed(&mut s);

    // The guest never answers: after part-io's connect timeout the host
    // stream closes and the guest gets a RST for the request it ignored.
    let started = Instant::now();
    let mut s = host_connect(&p, 54);
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst), (REQUEST, (G, 54)));
    closed(&mut s);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src, h.dst), (RST, req.src, (G, 54)), "{h:?}");
    wait_stat(&p, "host_refused", 1);
    assert!(p.log().contains("did not answer"), "{}", p.log());

    // A host port is not reused while its connection is open, and a good
    // connection still works after all this.
    let mut s = host_connect(&p, 55);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst), (REQUEST, (G, 55)));
    assert!(
        h.src.1 > req.src.1,
        "fresh host port {} after {}",
        h.src.1,
        req.src.1
    );
    g.send(Hdr::new(RESPONSE, (G, 55), h.src), &[]);
    assert_eq!(read_ok(&mut s), h.src.1);
    assert_eq!(stat(&p, "host_connections"), 1);
}

#[test]
fn a_guest_that_sends_past_its_credit_loses_only_that_connection() {
    let p = spawn_hybrid();
    let listener = host_listener(&p, 7);
    let other = host_listener(&p, 8);
    let mut g = guest(&p);
    let liar = (G, 2000);
    let honest = (G, 2001);
    for (me, port) in [(liar, 7), (honest, 8)] {
        g.send(Hdr::new(REQUEST, me, (2, port)), &[]);
        let (h, _) = g.recv();
        assert_eq!(h.op, RESPONSE);
    }
    // Neither host process reads: the liar ignores the credit it was given.
    let (_stalled, _) = listener.accept().unwrap();
    let (mut reader, _) = other.accept().unwrap();
    reader.set_read_timeout(Some(TIMEOUT)).unwrap();
    let chunk = vec![0x5a; 65_000];
    let mut sent = 0u64;
    let mut reset = false;
    for _ in 0..40 {
        g.send(Hdr::new(RW, liar, (2, 7)), &chunk);
        sent += chunk.len() as u64;
        while let Some((h, _)) = g.recv_timeout(Duration::from_millis(20)) {
            if h.op == RST && h.dst == liar {
                reset = true;
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "no RST after {sent} bytes: {}", stats(&p));
    assert_eq!(stat(&p, "host_credit_violations"), 1, "{}", stats(&p));
    assert!(p.log().contains("credit rule broken"), "{}", p.log());

    // The honest connection on the same partition still carries bytes.
    g.send(Hdr::new(RW, honest, (2, 8)), b"still here");
    let mut read = [0u8; 10];
    reader.read_exact(&mut read).unwrap();
    assert_eq!(&read, b"still here");
}

#[test]
fn a_flood_of_host_processes_is_capped_and_then_served() {
    let p = spawn_hybrid();
    let mut g = guest(&p);
    // 100 host processes that connect and say nothing.
    let silent: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(host_socket(&p)).unwrap())
        .collect();
    let deadline = Instant::now() + TIMEOUT;
    while stat(&p, "host_refused") < 36 {
        assert!(Instant::now() < deadline, "{}", stats(&p));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Their handshakes time out, and then a real one is served.
    let deadline = Instant::now() + TIMEOUT;
    while stat(&p, "host_protocol_errors") < 64 {
        assert!(Instant::now() < deadline, "{}", stats(&p));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stat(&p, "host_refused"), 36);
    drop(silent);
    let mut s = host_connect(&p, 60);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst), (REQUEST, (G, 60)));
    g.send(Hdr::new(RESPONSE, (G, 60), h.src), &[]);
    assert_eq!(read_ok(&mut s), h.src.1);
    let lines = p
        .log()
        .lines()
        .filter(|l| l.contains("host process"))
        .count();
    assert!(lines < 40, "{lines} log lines for 100 bad host processes");
}

#[test]
fn what_a_guest_sent_before_its_reset_still_reaches_the_host_process() {
    let p = spawn_hybrid();
    let listener = host_listener(&p, 9);
    let mut g = guest(&p);
    let me = (G, 3000);
    g.send(Hdr::new(REQUEST, me, (2, 9)), &[]);
    assert_eq!(g.recv().0.op, RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The host process is slow: the guest's bytes are still in part-io
    // when the guest resets (a Linux guest closing after its peer shut
    // down does exactly this).
    // 240 000 bytes: within part-io's 256 KiB of credit, more than the
    // host stream's socket buffer takes, so part-io still holds some.
    let data = pattern(240_000, 3);
    for chunk in data.chunks(60_000) {
        g.send(Hdr::new(RW, me, (2, 9)), chunk);
    }
    g.send(Hdr::new(RST, me, (2, 9)), &[]);
    std::thread::sleep(Duration::from_millis(100));
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert!(
        got == data,
        "{} of {} bytes reached the host",
        got.len(),
        data.len()
    );
    // Nothing more goes to the guest: no credit update, no RST.
    g.expect_nothing();
    assert_eq!(stat(&p, "host_open"), 0);
    assert_eq!(stat(&p, "guest_to_host_bytes"), data.len() as u64);
}

#[test]
fn a_host_listener_that_stops_accepting_refuses_at_once_and_stalls_nothing() {
    let p = spawn_hybrid();
    // A host service that listens with a backlog of one and never accepts.
    let path = format!("{}_11", host_socket(&p).display());
    let l = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    l.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
    l.listen(1).unwrap();
    let mut g = guest(&p);
    // The kernel queues what the backlog allows; after that a connect
    // would wait for an accept that never comes: part-io refuses at once
    // instead of stalling the guest's transmit queue.
    let mut answers = Vec::new();
    for i in 0..4u32 {
        g.send(Hdr::new(REQUEST, (G, 4000 + i), (2, 11)), &[]);
        let (h, _) = g.recv();
        assert_eq!(h.dst, (G, 4000 + i), "{h:?}");
        answers.push(h.op);
    }
    assert_eq!(answers[0], RESPONSE, "{answers:?}");
    let first_rst = answers.iter().position(|op| *op == RST).expect("a refusal");
    assert!(
        answers[first_rst..].iter().all(|op| *op == RST),
        "{answers:?}"
    );
    assert!(
        p.log().contains("is not accepting (backlog full)"),
        "{}",
        p.log()
    );
    // The guest's other traffic still flows: a fresh listener works.
    let ok = host_listener(&p, 12);
    g.send(Hdr::new(REQUEST, (G, 4100), (2, 12)), &[]);
    assert_eq!(g.recv().0.op, RESPONSE);
    let (mut s, _) = ok.accept().unwrap();
    g.send(Hdr::new(RW, (G, 4100), (2, 12)), b"fine");
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"fine");
}
