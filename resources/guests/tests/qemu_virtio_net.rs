//! The guest's virtio-net driver and `net=` words against QEMU microvm's
//! `virtio-net-device` (modern: `virtio-mmio.force-legacy=false`), linked
//! by QEMU's UDP socket netdev on loopback: either two guests (each QEMU
//! sends its frames as datagrams to the other's port), or one guest and
//! this test process playing the peer with the host crate's
//! `net_frame` builder and parser. UDP drops datagrams a slow reader
//! leaves in its socket buffer, and nothing is sent before the peer
//! answers a hello, so the transfers only work loss-free because of the
//! window and the handshake. Runner: `common/mod.rs`.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{boot, boot_pair, debug_exit_status, Boot, Outcome};
use partvisor_test_guest::net_frame::{
    build, parse, Frame, Kind, Mac, BROADCAST, BROADCAST_LEN, MAX_LEN, SMALL_LEN,
};
use partvisor_test_guest::{EXIT_NET_NO_DEVICE, EXIT_NET_TIMEOUT, EXIT_NET_VERIFY};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";
const GUEST: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
const HOST: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
/// QEMU microvm with `acpi=off` puts its one virtio-mmio device here.
const VIRTIO_LINE: &str = "virtio: 0xfeb00e00 gsi 12 device 1 version 2 vendor 0x554d4551";

/// A loopback UDP port nobody uses right now.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// QEMU arguments for one virtio-net-device sending to `remote`, receiving
/// on `local`.
fn nic(mac: &str, local: u16, remote: u16) -> Vec<String> {
    nic_with(mac, local, remote, "")
}

/// [`nic`] with `opts` appended to `-device`.
fn nic_with(mac: &str, local: u16, remote: u16, opts: &str) -> Vec<String> {
    [
        "-global",
        "virtio-mmio.force-legacy=false",
        "-netdev",
        &format!("socket,id=n0,udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}"),
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={mac}{opts}"),
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Boot guest A (`MAC_A`) and guest B (`MAC_B`) linked to each other.
fn pair(cmd_a: &str, cmd_b: &str) -> (Outcome, Outcome) {
    pair_with(cmd_a, cmd_b, "")
}

/// [`pair`] with `opts` appended to both `-device`s.
fn pair_with(cmd_a: &str, cmd_b: &str, opts: &str) -> (Outcome, Outcome) {
    let (pa, pb) = (free_port(), free_port());
    let (na, nb) = (nic_with(MAC_A, pa, pb, opts), nic_with(MAC_B, pb, pa, opts));
    let (aa, ab) = (strs(&na), strs(&nb));
    boot_pair(
        Boot {
            machine: "microvm,acpi=off",
            cmdline: cmd_a,
            extra_args: &aa,
            ..Boot::default()
        },
        Boot {
            machine: "microvm,acpi=off",
            cmdline: cmd_b,
            extra_args: &ab,
            ..Boot::default()
        },
    )
}

fn lines(out: &Outcome, prefix: &str) -> Vec<String> {
    out.report()
        .lines
        .into_iter()
        .filter(|l| l.starts_with(prefix))
        .collect()
}

fn has_line(out: &Outcome, line: &str) -> bool {
    out.report().lines.iter().any(|l| l == line)
}

/// The `<us>` of a `<prefix><us> us` line.
fn micros(out: &Outcome, prefix: &str) -> u64 {
    let l = lines(out, prefix);
    assert_eq!(l.len(), 1, "{prefix}: {out:#?}");
    l[0][prefix.len()..]
        .strip_suffix(" us")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad line {:?}", l[0]))
}

#[test]
fn two_guests_exchange_10000_full_size_frames_with_zero_loss() {
    let (a, b) = pair("net=recv:10000", &format!("net=send:{MAC_A}:10000:1514"));
    assert!(has_line(&a, VIRTIO_LINE), "{a:#?}");
    let ready = lines(&a, "net: ready ");
    assert_eq!(ready.len(), 1, "{a:#?}");
    // VERSION_1 | EVENT_IDX | MAC: nothing else is accepted.
    assert_eq!(
        ready[0],
        format!("net: ready mac={MAC_A} queue=256 features=0x0000000120000020")
    );
    assert!(
        has_line(&a, "net: received 10000 frames ok lost=0 bad=0 dup=0"),
        "{a:#?}"
    );
    let ra = a.report();
    assert_eq!(ra.net_ready[0].mac, GUEST);
    assert_eq!(ra.net_ready[0].features, 0x1_2000_0020);
    assert_eq!(ra.net_received.len(), 1);
    // The default window is 32: never more than 31 frames past the last ack.
    assert_eq!(ra.net_max_ahead.len(), 1);
    assert!((1..32).contains(&ra.net_max_ahead[0]), "{ra:?}");
    assert_eq!(a.status, debug_exit_status(0), "{a:#?}");
    assert!(has_line(&b, "net: sent 10000 frames"), "{b:#?}");
    let send = b.report().net_sends;
    assert_eq!(send.len(), 1, "{b:#?}");
    assert_eq!((send[0].frames, send[0].size), (10000, 1514));
    assert!(send[0].us > 0);
    assert_eq!(b.status, debug_exit_status(0), "{b:#?}");
}

#[test]
fn a_slow_receiver_never_sees_more_than_the_window() {
    // The receiver holds each batch of buffers 3 ms before giving them back
    // and acknowledging: the sender fills its window of 8 and waits. (How
    // full the window gets depends on how the batches split; that it is
    // used fully is pinned by the host-peer test below.)
    let (a, b) = pair("net=recv:300:3000", &format!("net=send:{MAC_A}:300:200:8"));
    assert!(
        has_line(&a, "net: received 300 frames ok lost=0 bad=0 dup=0"),
        "{a:#?}"
    );
    let ahead = a.report().net_max_ahead;
    assert!(ahead.len() == 1 && (1..=7).contains(&ahead[0]), "{a:#?}");
    assert_eq!(a.status, debug_exit_status(0), "{a:#?}");
    // At least 300 / 8 batches, each held 3 ms.
    let us = micros(&b, "net: send 300 frames 200 bytes in ");
    assert!(us >= 300 / 8 * 3000, "{us} us");
    assert_eq!(b.status, debug_exit_status(0), "{b:#?}");
}

#[test]
fn ping_pong_reports_round_trips() {
    let (a, b) = pair("net=pong:200", &format!("net=ping:{MAC_A}:200"));
    assert!(has_line(&a, "net: ponged 200 round trips"), "{a:#?}");
    assert!(micros(&b, "net: rtt 200 round trips in ") > 0, "{b:#?}");
    assert_eq!(b.report().net_rtts[0].rounds, 200);
    assert_eq!(a.status, debug_exit_status(0), "{a:#?}");
    assert_eq!(b.status, debug_exit_status(0), "{b:#?}");
}

#[test]
fn broadcast_and_spoofed_frames_are_printed_by_a_listener() {
    // One round trip first, so B only broadcasts once A listens.
    let (a, b) = pair(
        "net=pong:1 net=recv-any:3",
        &format!("net=ping:{MAC_A}:1 net=broadcast:2 net=spoof:1"),
    );
    let frames = lines(&a, "net: frame ");
    assert_eq!(
        frames,
        [
            format!("net: frame src={MAC_B} dst=ff:ff:ff:ff:ff:ff type=0x88b5 len=100 pvnf=broadcast:0:ok"),
            format!("net: frame src={MAC_B} dst=ff:ff:ff:ff:ff:ff type=0x88b5 len=100 pvnf=broadcast:1:ok"),
            "net: frame src=02:de:ad:be:ef:01 dst=ff:ff:ff:ff:ff:ff type=0x88b5 len=100 pvnf=spoof:0:ok".to_string(),
        ],
        "{a:#?}"
    );
    assert!(has_line(&a, "net: received 3 frames"), "{a:#?}");
    let parsed = a.report().net_frames;
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[2].src, partvisor_test_guest::net_frame::SPOOF_SOURCE);
    assert_eq!(parsed[2].pvnf, Some(("spoof".to_string(), 0, true)));
    assert!(has_line(&b, "net: broadcast 2 frames"), "{b:#?}");
    assert!(has_line(&b, "net: spoofed 1 frames"), "{b:#?}");
    assert_eq!(a.status, debug_exit_status(0), "{a:#?}");
    assert_eq!(b.status, debug_exit_status(0), "{b:#?}");
}

#[test]
fn expect_none_counts_every_frame_in_its_window() {
    let (a, b) = pair("net=expect-none:300", "net=mac");
    assert!(has_line(&a, "net: received 0 frames"), "{a:#?}");
    assert_eq!(a.status, debug_exit_status(0), "{a:#?}");
    assert_eq!(b.status, debug_exit_status(0), "{b:#?}");
    // The same word does see frames when there are some.
    let (a, _) = pair(
        "net=pong:1 net=expect-none:500",
        &format!("net=ping:{MAC_A}:1 net=broadcast:3"),
    );
    assert!(has_line(&a, "net: received 3 frames"), "{a:#?}");
}

#[test]
fn a_listening_guest_sleeps_instead_of_spinning() {
    let args = nic(MAC_A, free_port(), free_port());
    let args = strs(&args);
    let out = boot(Boot {
        machine: "microvm,acpi=off",
        cmdline: "net=expect-none:2000",
        extra_args: &args,
        ..Boot::default()
    });
    assert!(has_line(&out, "net: received 0 frames"), "{out:#?}");
    // 2 s of spinning would be ~200 ticks (USER_HZ 100); QEMU's own start
    // and exit take a few.
    eprintln!("cpu ticks: {}", out.cpu_ticks);
    assert!(out.cpu_ticks < 60, "{} ticks: {out:#?}", out.cpu_ticks);
}

#[test]
fn a_receiver_missing_frames_times_out_with_its_count() {
    let (a, b) = pair("net=recv:100", &format!("net=send:{MAC_A}:60:64"));
    assert!(has_line(&b, "net: sent 60 frames"), "{b:#?}");
    assert!(
        has_line(&a, "net: timeout: received 60 of 100 data frames"),
        "{a:#?}"
    );
    assert_eq!(a.report().exit, Some(EXIT_NET_TIMEOUT));
    assert_eq!(a.status, debug_exit_status(EXIT_NET_TIMEOUT as i32));
}

#[test]
fn transfers_and_round_trips_work_without_event_idx() {
    // Notification by the used ring's NO_NOTIFY flag and interrupts on
    // every used element instead of avail_event / used_event.
    let (a, b) = pair_with(
        "net=recv:2000 net=pong:100",
        &format!("net=send:{MAC_A}:2000:700 net=ping:{MAC_A}:100"),
        ",event_idx=off",
    );
    assert_eq!(a.report().net_ready[0].features, 0x1_0000_0020, "{a:#?}");
    assert!(
        has_line(&a, "net: received 2000 frames ok lost=0 bad=0 dup=0"),
        "{a:#?}"
    );
    assert!(has_line(&a, "net: ponged 100 round trips"), "{a:#?}");
    assert_eq!(b.report().net_rtts[0].rounds, 100, "{b:#?}");
    assert_eq!(a.status, debug_exit_status(0), "{a:#?}");
    assert_eq!(b.status, debug_exit_status(0), "{b:#?}");
}

#[test]
fn net_use_selects_among_declared_nics() {
    let mut args = nic(MAC_A, free_port(), free_port());
    args.extend([
        "-netdev".to_string(),
        format!(
            "socket,id=n1,udp=127.0.0.1:{},localaddr=127.0.0.1:{}",
            free_port(),
            free_port()
        ),
        "-device".to_string(),
        format!("virtio-net-device,netdev=n1,mac={MAC_B}"),
    ]);
    let args = strs(&args);
    let out = boot(Boot {
        machine: "microvm,acpi=off",
        cmdline: "net=mac net=use:1 net=expect-none:0 net=mac net=use:2",
        extra_args: &args,
        ..Boot::default()
    });
    let macs: Vec<String> = out
        .report()
        .net_ready
        .iter()
        .map(|r| Mac(r.mac).to_string())
        .collect();
    // net=mac on a live device repeats its ready line.
    assert_eq!(macs, [MAC_A, MAC_B, MAC_B], "{out:#?}");
    // QEMU microvm (acpi=off) declares its transports from the top down.
    assert!(
        has_line(&out, "net: using device 1 at 0xfeb00c00"),
        "{out:#?}"
    );
    assert!(has_line(&out, "net: no virtio-net device 2"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(EXIT_NET_NO_DEVICE as i32));
}

#[test]
fn no_virtio_net_device_exits_20() {
    let out = boot(Boot {
        machine: "microvm,acpi=off",
        cmdline: "net=mac",
        ..Boot::default()
    });
    assert!(
        has_line(&out, "net: no usable virtio-net device"),
        "{out:#?}"
    );
    assert_eq!(out.status, debug_exit_status(EXIT_NET_NO_DEVICE as i32));
}

/// This process as the guest's peer on a UDP socket.
struct HostPeer {
    sock: UdpSocket,
    guest_port: u16,
}

impl HostPeer {
    fn new() -> (HostPeer, u16) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let host_port = sock.local_addr().unwrap().port();
        (
            HostPeer {
                sock,
                guest_port: free_port(),
            },
            host_port,
        )
    }

    fn send(&self, frame: &[u8]) {
        self.sock
            .send_to(frame, ("127.0.0.1", self.guest_port))
            .unwrap();
    }

    fn frame(kind: Kind, seq: u64, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; MAX_LEN];
        let n = build(&mut f, GUEST, HOST, kind, seq, len).unwrap();
        f.truncate(n);
        f
    }

    /// The next frame of ours from the guest, within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Frame> {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            if let Ok(n) = self.sock.recv(&mut buf) {
                if let Ok(f) = parse(&buf[..n]) {
                    return Some(f);
                }
            }
        }
        None
    }

    /// Hello until the guest acknowledges (it is booted and listening).
    fn handshake(&self) {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            self.send(&HostPeer::frame(Kind::Hello, 0, SMALL_LEN));
            if let Some(f) = self.recv(Duration::from_millis(20)) {
                if f.kind == Kind::Ack && f.src == GUEST && f.intact {
                    return;
                }
            }
        }
        panic!("guest never answered");
    }
}

/// Boot the guest with `cmdline` while `peer` runs in a thread.
fn with_host_peer<T: Send + 'static>(
    cmdline: &str,
    peer: impl FnOnce(HostPeer) -> T + Send + 'static,
) -> (Outcome, T) {
    let (host, host_port) = HostPeer::new();
    let args = nic(MAC_A, host.guest_port, host_port);
    let args = strs(&args);
    let t = std::thread::spawn(move || peer(host));
    let out = boot(Boot {
        machine: "microvm,acpi=off",
        cmdline,
        extra_args: &args,
        ..Boot::default()
    });
    (out, t.join().unwrap())
}

/// The host sends 20 data frames (changed by `mangle`, which also says
/// how many times to send each), then collects the guest's acks and
/// broadcasts.
fn host_sends(mangle: fn(u64, &mut Vec<u8>) -> usize) -> (Outcome, Vec<Frame>) {
    with_host_peer("net=recv:20 net=broadcast:2", move |host| {
        host.handshake();
        for seq in 0..20 {
            let mut f = HostPeer::frame(Kind::Data, seq, 300);
            for _ in 0..mangle(seq, &mut f) {
                host.send(&f);
            }
        }
        let mut seen = Vec::new();
        while let Some(f) = host.recv(Duration::from_secs(5)) {
            let last = f.kind == Kind::Broadcast && f.seq == 1;
            seen.push(f);
            if last {
                break;
            }
        }
        seen
    })
}

#[test]
fn the_guest_verifies_host_built_frames_and_sends_parseable_ones() {
    let (out, seen) = host_sends(|_, _| 1);
    assert!(
        has_line(&out, "net: received 20 frames ok lost=0 bad=0 dup=0"),
        "{out:#?}"
    );
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
    // Cumulative acks end at 20; then the two broadcasts, intact.
    // (Answers to surplus handshake hellos carry 0.)
    let acks: Vec<u64> = seen
        .iter()
        .filter(|f| f.kind == Kind::Ack && f.seq > 0)
        .map(|f| f.seq)
        .collect();
    assert_eq!(acks.last(), Some(&20), "{seen:?}");
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "{acks:?}");
    let bcast: Vec<&Frame> = seen.iter().filter(|f| f.kind == Kind::Broadcast).collect();
    assert_eq!(bcast.len(), 2, "{seen:?}");
    for (i, f) in bcast.iter().enumerate() {
        assert_eq!(
            (f.dst, f.src, f.seq, f.len, f.intact),
            (BROADCAST, GUEST, i as u64, BROADCAST_LEN, true)
        );
    }
}

#[test]
fn the_guest_counts_damaged_missing_and_repeated_frames() {
    // Frame 5 damaged in transit.
    let (out, _) = host_sends(|seq, f| {
        if seq == 5 {
            f[100] ^= 0x20;
        }
        1
    });
    assert!(
        has_line(&out, "net: received 19 frames ok lost=0 bad=1 dup=0"),
        "{out:#?}"
    );
    assert_eq!(out.report().exit, Some(EXIT_NET_VERIFY));
    assert!(
        has_line(&out, "net: broadcast 2 frames"),
        "later words still run"
    );
    // Frame 7 never sent.
    let (out, _) = host_sends(|seq, _| usize::from(seq != 7));
    assert!(
        has_line(&out, "net: received 19 frames ok lost=1 bad=0 dup=0"),
        "{out:#?}"
    );
    assert_eq!(out.status, debug_exit_status(EXIT_NET_VERIFY as i32));
    // Frame 3 sent twice.
    let (out, _) = host_sends(|seq, _| if seq == 3 { 2 } else { 1 });
    assert!(
        has_line(&out, "net: received 20 frames ok lost=0 bad=0 dup=1"),
        "{out:#?}"
    );
    assert_eq!(out.status, debug_exit_status(EXIT_NET_VERIFY as i32));
}

#[test]
fn recv_any_with_an_ethertype_skips_other_frames() {
    let (out, ()) = with_host_peer("net=pong:1 net=recv-any:1:0x88b5", |host| {
        host.handshake();
        // One round trip: the pong word is done, recv-any is next.
        host.send(&HostPeer::frame(Kind::Ping, 0, SMALL_LEN));
        while host
            .recv(Duration::from_secs(5))
            .is_some_and(|f| f.kind != Kind::Pong)
        {}
        // An IPv6-looking frame (what a host kernel sends through a TAP),
        // then one of ours.
        let mut foreign = HostPeer::frame(Kind::Data, 0, 86);
        foreign[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 0x16]);
        foreign[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        host.send(&foreign);
        host.send(&HostPeer::frame(Kind::Broadcast, 9, BROADCAST_LEN));
    });
    assert_eq!(
        lines(&out, "net: frame "),
        ["net: frame src=02:00:00:00:00:99 dst=52:54:00:00:00:0a type=0x88b5 len=100 pvnf=broadcast:9:ok"],
        "{out:#?}"
    );
    assert!(has_line(&out, "net: received 1 frames"), "{out:#?}");
    assert!(
        has_line(&out, "net: ignored 1 frames of other ethertypes"),
        "{out:#?}"
    );
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn a_sender_whose_acks_stall_asks_for_them_with_a_hello() {
    // The host acknowledges only when asked: every hello gets an ack of
    // everything received so far. The guest asks 200 ms after its window
    // (8) is full, three times for 24 frames.
    let cmd = format!("net=send:{}:24:100:8", Mac(HOST));
    let (out, hellos) = with_host_peer(&cmd, |host| {
        let (mut received, mut hellos) = (0u64, Vec::new());
        // The first frame comes once QEMU has started and the guest booted,
        // which on a loaded machine can take longer than the gap between
        // frames: wait for it generously, then 3 s between frames.
        let mut wait = Duration::from_secs(60);
        while let Some(f) = host.recv(wait) {
            wait = Duration::from_secs(3);
            match f.kind {
                Kind::Data => received += 1,
                Kind::Hello => {
                    hellos.push(f.seq);
                    host.send(&HostPeer::frame(Kind::Ack, received, SMALL_LEN));
                    if received == 24 {
                        break;
                    }
                }
                _ => {}
            }
        }
        hellos
    });
    assert!(has_line(&out, "net: sent 24 frames"), "{out:#?}");
    // The handshake hello(s) carry 0, the solicitations the frames sent
    // (repeated if an answer took longer than 200 ms).
    let mut asked: Vec<u64> = hellos.into_iter().filter(|&s| s > 0).collect();
    let solicited = asked.len();
    asked.dedup();
    assert_eq!(asked, [8, 16, 24], "{out:#?}");
    assert!(
        has_line(&out, &format!("net: acks solicited {solicited} times")),
        "{out:#?}"
    );
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn frames_behind_a_words_last_frame_are_kept_for_the_next_word() {
    // A ping and three broadcasts back to back: they arrive in the pong
    // word's batch or while it waits for its pong to leave.
    let (out, ()) = with_host_peer("net=pong:1 net=recv-any:3", |host| {
        host.handshake();
        host.send(&HostPeer::frame(Kind::Ping, 0, SMALL_LEN));
        for seq in 0..3 {
            host.send(&HostPeer::frame(Kind::Broadcast, seq, BROADCAST_LEN));
        }
    });
    let seqs: Vec<u64> = out
        .report()
        .net_frames
        .iter()
        .filter_map(|f| f.pvnf.as_ref().map(|p| p.1))
        .collect();
    assert_eq!(seqs, [0, 1, 2], "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn the_sender_keeps_at_most_its_window_unacknowledged() {
    // The host acknowledges only when the guest has stopped sending for
    // 30 ms, so the guest runs into its window (8) again and again. A data
    // frame's number is never 8 or more past the host's last ack.
    let cmd = format!("net=send:{}:100:128:8", Mac(HOST));
    let (out, (seqs, max_ahead, bursts)) = with_host_peer(&cmd, |host| {
        // The guest's hellos: answer the first one.
        loop {
            let f = host.recv(Duration::from_secs(20)).expect("a hello");
            if f.kind == Kind::Hello {
                host.send(&HostPeer::frame(Kind::Ack, 0, SMALL_LEN));
                break;
            }
        }
        let mut seqs = Vec::new();
        let (mut acked, mut max_ahead) = (0u64, 0u64);
        let mut bursts = Vec::new();
        let end = Instant::now() + Duration::from_secs(20);
        while seqs.len() < 100 && Instant::now() < end {
            match host.recv(Duration::from_millis(30)) {
                Some(f) if f.kind == Kind::Data => {
                    assert!(f.intact && f.len == 128 && f.src == GUEST, "{f:?}");
                    max_ahead = max_ahead.max(f.seq - acked);
                    seqs.push(f.seq);
                }
                Some(_) => {}
                None if seqs.len() as u64 > acked => {
                    bursts.push(seqs.len() as u64 - acked);
                    acked = seqs.len() as u64;
                    host.send(&HostPeer::frame(Kind::Ack, acked, SMALL_LEN));
                }
                None => {}
            }
        }
        host.send(&HostPeer::frame(Kind::Ack, seqs.len() as u64, SMALL_LEN));
        (seqs, max_ahead, bursts)
    });
    assert_eq!(seqs, (0..100).collect::<Vec<u64>>(), "{out:#?}");
    assert_eq!(max_ahead, 7, "the window is used fully, never exceeded");
    assert!(bursts.iter().all(|&b| b <= 8), "{bursts:?}");
    assert!(has_line(&out, "net: sent 100 frames"), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}
