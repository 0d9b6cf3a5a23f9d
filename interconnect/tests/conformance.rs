//! One conformance suite, run against every transport with the two peers in
//! separate `ic-peer` processes (and, for tcp, also across two network
//! namespaces joined by veth: see `netns.rs`).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::time::{Duration, Instant};

use common::netns::Netns;
use common::*;
use interconnect::Transport;

const MAX_MESSAGE: u64 = interconnect::MAX_MESSAGE;
const MAX_READ: u64 = interconnect::MAX_READ;

pub fn send_and_send_with_imm_deliver_payload_and_immediate(p: &mut Pair) {
    p.srv.reg("rbuf", 8192, "lw", 0);
    p.srv.ok("recv rbuf 0 4096 1");
    p.srv.ok("recv rbuf 4096 4096 2");
    p.cli.reg("sbuf", 8192, "none", 7);
    p.cli.ok("fill sbuf 0 100 65");
    p.cli.ok("post send sbuf 0 100 10");
    p.cli.ok("post send_imm sbuf 0 50 11 0 0 99");
    assert_eq!(p.cli.poll(2, 5000), ["10,ok,Send,100,-", "11,ok,Send,50,-"]);
    assert_eq!(p.srv.poll(2, 5000), ["1,ok,Recv,100,-", "2,ok,Recv,50,99"]);
    assert_eq!(p.srv.distinct("rbuf", 0, 100), "{65}");
    assert_eq!(p.srv.distinct("rbuf", 100, 3996), "{0}");
    assert_eq!(p.srv.distinct("rbuf", 4096, 50), "{65}");
    let s = p.cli.ok("stats").join(" ");
    assert!(
        s.contains("sends_posted: 2")
            && s.contains("bytes_out: 150")
            && s.contains("completions_ok: 2"),
        "{s}"
    );
    let s = p.srv.ok("stats").join(" ");
    assert!(
        s.contains("recvs_posted: 2")
            && s.contains("bytes_in: 150")
            && s.contains("remote_ops_applied: 2"),
        "{s}"
    );
}

pub fn rdma_write_lands_and_write_with_imm_consumes_a_receive(p: &mut Pair) {
    let r = p.srv.reg("t", 65536, "lw,rw", 0);
    p.srv.reg("r", 4096, "lw", 0);
    p.srv.ok("recv r 0 4096 5");
    p.cli.reg("s", 65536, "none", 9);
    p.cli.ok(&format!("post write s 0 1000 20 {r} 500"));
    assert_eq!(p.cli.poll(1, 5000), ["20,ok,RdmaWrite,1000,-"]);
    assert_eq!(p.srv.distinct("t", 500, 1000), "{9}");
    assert_eq!(p.srv.distinct("t", 0, 500), "{0}");
    assert_eq!(p.srv.distinct("t", 1500, 64036), "{0}");
    assert!(
        p.srv.poll(1, 100).is_empty(),
        "a plain RDMA WRITE consumes no receive"
    );
    p.cli.ok(&format!("post write_imm s 0 10 21 {r} 0 1234"));
    assert_eq!(p.cli.poll(1, 5000), ["21,ok,RdmaWrite,10,-"]);
    assert_eq!(p.srv.poll(1, 5000), ["5,ok,RecvRdmaWithImm,10,1234"]);
    assert_eq!(p.srv.distinct("t", 0, 10), "{9}");
}

pub fn rdma_read_returns_target_memory(p: &mut Pair) {
    let r = p.srv.reg("t", 65536, "rr", 0x5a);
    p.cli.reg("d", 65536, "lw", 0);
    p.cli.ok(&format!("post read d 100 4000 30 {r} 8"));
    assert_eq!(p.cli.poll(1, 5000), ["30,ok,RdmaRead,4000,-"]);
    assert_eq!(p.cli.distinct("d", 100, 4000), "{90}");
    assert_eq!(p.cli.distinct("d", 0, 100), "{0}");
    let big = p.srv.reg("big", MAX_READ, "rr", 3);
    p.cli.reg("bigd", MAX_READ, "lw", 0);
    p.cli.ok(&format!("post read bigd 0 {MAX_READ} 31 {big} 0"));
    p.cli.ok(&format!("post read d 0 16 32 {r} 0"));
    assert_eq!(
        p.cli.poll(2, 10000),
        [
            format!("31,ok,RdmaRead,{MAX_READ},-"),
            "32,ok,RdmaRead,16,-".into()
        ]
    );
    assert_eq!(p.cli.distinct("bigd", 0, MAX_READ), "{3}");
}

pub fn forged_rkey_and_out_of_bounds_are_remote_access_errors_and_target_untouched(p: &mut Pair) {
    let r = p.srv.reg("t", 4096, "lw,rw,rr", 0x11);
    p.cli.reg("s", 8192, "lw", 0x22);
    let forged = r ^ 0x5a5a_5a5a;
    p.cli.ok(&format!("post write s 0 16 40 {forged} 0"));
    p.cli.ok(&format!("post write s 0 16 41 {r} 4090"));
    p.cli.ok(&format!("post write s 0 8192 42 {r} 0"));
    p.cli.ok(&format!("post read s 0 16 43 {r} 4095"));
    p.cli.ok(&format!("post read s 0 16 44 {forged} 0"));
    p.cli
        .ok(&format!("post write s 0 16 45 {r} {}", u64::MAX - 4));
    let wcs = p.cli.poll(6, 5000);
    assert_eq!(wcs.len(), 6, "{wcs:?}");
    for w in &wcs {
        assert!(w.contains(",rem_access,"), "{wcs:?}");
    }
    assert_eq!(p.srv.distinct("t", 0, 4096), "{17}");
    let s = p.srv.ok("stats").join(" ");
    assert!(
        s.contains("remote_ops_refused: 6") && s.contains("remote_ops_applied: 0"),
        "{s}"
    );
    // The QP is still usable afterwards.
    p.cli.ok(&format!("post write s 0 16 46 {r} 0"));
    assert_eq!(p.cli.poll(1, 5000), ["46,ok,RdmaWrite,16,-"]);
    assert_eq!(p.srv.distinct("t", 0, 16), "{34}");
}

pub fn access_flags_are_enforced_by_the_target(p: &mut Pair) {
    let ro = p.srv.reg("ro", 4096, "rr", 0x33);
    let wo = p.srv.reg("wo", 4096, "lw,rw", 0x44);
    let local_only = p.srv.reg("lo", 4096, "lw", 0x55);
    p.cli.reg("s", 4096, "lw", 0x66);
    p.cli.ok(&format!("post write s 0 64 1 {ro} 0"));
    p.cli.ok(&format!("post read s 0 64 2 {wo} 0"));
    p.cli.ok(&format!("post write s 0 64 3 {local_only} 0"));
    p.cli.ok(&format!("post read s 0 64 4 {local_only} 0"));
    assert_eq!(
        p.cli.poll(4, 5000),
        [
            "1,rem_access,RdmaWrite,0,-",
            "2,rem_access,RdmaRead,0,-",
            "3,rem_access,RdmaWrite,0,-",
            "4,rem_access,RdmaRead,0,-"
        ]
    );
    assert_eq!(p.srv.distinct("ro", 0, 4096), "{51}");
    assert_eq!(p.srv.distinct("lo", 0, 4096), "{85}");
    assert_eq!(
        p.cli.distinct("s", 0, 4096),
        "{102}",
        "a refused read must not write the destination"
    );
}

pub fn deregistration_revokes_remote_access_at_once(p: &mut Pair) {
    let r = p.srv.reg("t", 4096, "lw,rw,rr", 1);
    p.cli.reg("s", 4096, "lw", 0x22);
    p.cli.ok(&format!("post write s 0 4096 1 {r} 0"));
    assert_eq!(p.cli.poll(1, 5000), ["1,ok,RdmaWrite,4096,-"]);
    assert_eq!(p.srv.distinct("t", 0, 4096), "{34}");
    p.srv.ok("dereg t");
    p.cli.ok("fill s 0 4096 119");
    p.cli.ok(&format!("post write s 0 4096 2 {r} 0"));
    p.cli.ok(&format!("post read s 0 64 3 {r} 0"));
    assert_eq!(
        p.cli.poll(2, 5000),
        ["2,rem_access,RdmaWrite,0,-", "3,rem_access,RdmaRead,0,-"]
    );
    assert_eq!(p.srv.distinct("t", 0, 4096), "{34}");
    assert_eq!(p.cli.distinct("s", 0, 64), "{119}");
}

pub fn receive_problems_give_local_errors_at_the_target_and_remote_operation_at_the_sender(
    p: &mut Pair,
) {
    p.srv.reg("r", 4096, "lw", 0);
    p.srv.reg("nolw", 4096, "none", 0);
    p.srv.ok("recv r 0 10 7");
    p.srv.ok("recv nolw 0 100 8");
    p.srv.ok("recv @4242 0 100 9");
    p.cli.reg("s", 4096, "none", 1);
    p.cli.ok("post send s 0 100 50");
    p.cli.ok("post send s 0 10 51");
    p.cli.ok("post send s 0 10 52");
    assert_eq!(
        p.cli.poll(3, 5000),
        [
            "50,rem_op,Send,0,-",
            "51,rem_op,Send,0,-",
            "52,rem_op,Send,0,-"
        ]
    );
    assert_eq!(
        p.srv.poll(3, 5000),
        [
            "7,loc_len,Recv,0,-",
            "8,loc_prot,Recv,0,-",
            "9,loc_prot,Recv,0,-"
        ]
    );
    assert_eq!(p.srv.distinct("r", 0, 4096), "{0}");
}

pub fn local_errors_complete_in_order_without_touching_the_wire(p: &mut Pair) {
    p.cli.reg("s", 4096, "none", 1);
    p.cli.reg("d", 4096, "lw", 0);
    let r = p.srv.reg("t", 4096, "rr,rw,lw", 2);
    p.cli.ok("post send @12345 0 10 60");
    p.cli.ok(&format!("post read s 0 16 61 {r} 0"));
    p.cli.ok(&format!("post send d 0 {} 62", MAX_MESSAGE + 1));
    p.cli
        .ok(&format!("post read d 0 {} 63 {r} 0", MAX_READ + 1));
    p.cli.ok("post send s 4000 200 64");
    p.cli.ok(&format!("post read d 0 8 65 {r} 0"));
    assert_eq!(
        p.cli.poll(6, 5000),
        [
            "60,loc_prot,Send,0,-",
            "61,loc_prot,RdmaRead,0,-",
            "62,loc_len,Send,0,-",
            "63,loc_len,RdmaRead,0,-",
            "64,loc_prot,Send,0,-",
            "65,ok,RdmaRead,8,-"
        ]
    );
    let s = p.srv.ok("stats").join(" ");
    assert!(
        s.contains("remote_ops_applied: 1") && s.contains("remote_ops_refused: 0"),
        "only the good read reaches the target: {s}"
    );
}

pub fn send_waits_for_a_posted_receive(p: &mut Pair) {
    p.cli.reg("s", 4096, "none", 8);
    p.cli.ok("post send s 0 8 70");
    assert!(
        p.cli.poll(1, 300).is_empty(),
        "no receive posted: the send must wait"
    );
    let s = p.srv.ok("stats").join(" ");
    assert!(s.contains("rnr_waits: 1"), "{s}");
    p.srv.reg("r", 4096, "lw", 0);
    p.srv.ok("recv r 0 64 1");
    assert_eq!(p.cli.poll(1, 5000), ["70,ok,Send,8,-"]);
    assert_eq!(p.srv.poll(1, 5000), ["1,ok,Recv,8,-"]);
}

pub fn unsignaled_sends_complete_silently_unless_they_fail(p: &mut Pair) {
    p.srv.reg("r", 4096, "lw", 0);
    p.srv.ok("recv r 0 64 1");
    p.cli.reg("s", 4096, "none", 8);
    p.cli.ok("post send s 0 8 80 0 0 - 0");
    p.cli.ok("post write s 0 8 81 999 0 - 0");
    p.cli.ok("post send s 0 8 82 0 0 - 1");
    assert_eq!(p.srv.poll(1, 5000), ["1,ok,Recv,8,-"]);
    let w = p.cli.poll(3, 1500);
    assert_eq!(
        w,
        ["81,rem_access,RdmaWrite,0,-"],
        "only the failed unsignaled request completes (82 waits for a receive)"
    );
}

pub fn cq_notification_fires_once_per_arming(p: &mut Pair) {
    p.srv.reg("r", 4096, "lw", 0);
    p.srv.ok("arm");
    for i in 0..3 {
        p.srv.ok(&format!("recv r {} 64 {i}", i * 64));
    }
    p.cli.reg("s", 4096, "none", 8);
    p.cli.ok("post send s 0 8 1");
    p.cli.ok("post send s 0 8 2");
    assert_eq!(p.cli.poll(2, 5000).len(), 2);
    assert_eq!(p.srv.ok("wait_notify 5000"), ["true"]);
    assert_eq!(
        p.srv.ok("fired"),
        ["1"],
        "two completions, one arming: one callback"
    );
    p.srv.ok("arm");
    assert_eq!(
        p.srv.ok("fired"),
        ["2"],
        "arming with completions queued fires at once"
    );
    assert_eq!(p.srv.poll(2, 5000).len(), 2);
    p.srv.ok("arm");
    assert_eq!(p.srv.ok("wait_notify 200"), ["true"]);
    assert_eq!(p.srv.ok("wait_notify 200"), ["false"]);
    assert_eq!(p.srv.ok("fired"), ["2"]);
    p.cli.ok("post send s 0 8 3");
    assert_eq!(p.srv.ok("wait_notify 5000"), ["true"]);
    assert_eq!(p.srv.ok("fired"), ["3"]);
}

pub fn peer_destroying_its_qp_terminates_ours_and_flushes(p: &mut Pair) {
    p.srv.reg("r", 4096, "lw", 0);
    p.srv.ok("recv r 0 64 1");
    p.srv.ok("recv r 64 64 2");
    p.cli.reg("r", 4096, "lw", 0);
    p.cli.ok("recv r 0 64 3");
    p.cli.ok("destroy");
    assert_eq!(
        p.cli.poll(1, 5000),
        ["3,flushed,Recv,0,-"],
        "destroy flushes our own receives"
    );
    assert_eq!(p.srv.ok("event 5000"), ["PeerClosed"]);
    assert_eq!(
        p.srv.poll(2, 5000),
        ["1,flushed,Recv,0,-", "2,flushed,Recv,0,-"]
    );
    assert!(p.srv.ok("state")[0..2].join(" ").starts_with("in error"));
    p.srv.reg("s", 4096, "none", 0);
    p.srv.ok("post send s 0 8 9");
    assert_eq!(p.srv.poll(1, 5000), ["9,flushed,Send,0,-"]);
}

pub fn closing_the_access_layer_tells_the_peer(p: &mut Pair) {
    p.cli.ok("close");
    assert_eq!(p.srv.ok("event 5000"), ["PeerClosed"]);
    assert!(
        p.cli.cmd("reg x 4096 none 0").starts_with("err"),
        "closed access layer refuses new objects"
    );
}

pub fn port_reset_clears_the_ports_queue_pairs(p: &mut Pair) {
    p.cli.reg("r", 4096, "lw", 0);
    p.cli.ok("recv r 0 64 3");
    let other = if p.t == Transport::Shm { "tcp" } else { "shm" };
    assert_eq!(p.cli.ok(&format!("port_reset {other}")), ["0"]);
    assert_eq!(p.cli.ok(&format!("port_reset {}", tname(p.t))), ["1"]);
    assert_eq!(p.cli.poll(1, 5000), ["3,flushed,Recv,0,-"]);
    assert_eq!(p.srv.ok("event 5000"), ["PeerClosed"]);
}

pub fn killed_peer_mid_transfer_flushes_and_does_not_hang(p: &mut Pair) {
    p.srv.reg("r", 1 << 20, "lw", 0);
    p.cli.reg("s", 1 << 20, "none", 1);
    p.srv.send("sink r 65536 1099511627776");
    p.cli.send("source s 65536 1099511627776");
    std::thread::sleep(Duration::from_millis(300));
    p.srv.kill();
    let t0 = Instant::now();
    let r = p.cli.answer(Duration::from_secs(20));
    assert!(
        r.starts_with("err source completion") && r.contains("flushed"),
        "{r}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let ev = p.cli.ok("event 5000").join(" ");
    assert!(ev.starts_with("PeerLost"), "{ev}");
    assert!(p.cli.ok("state").join(" ").starts_with("in error"));
}

pub fn simultaneous_large_writes_in_both_directions_do_not_deadlock(p: &mut Pair) {
    let len = MAX_MESSAGE;
    let rs = p.srv.reg("t", len, "lw,rw", 0);
    let rc = p.cli.reg("t", len, "lw,rw", 0);
    p.srv.reg("s", len, "none", 0x51);
    p.cli.reg("s", len, "none", 0x52);
    for i in 0..3 {
        p.srv.send(&format!("post write s 0 {len} {i} {rc} 0"));
        p.cli.send(&format!("post write s 0 {len} {i} {rs} 0"));
    }
    for _ in 0..3 {
        assert_eq!(p.srv.answer(Duration::from_secs(30)), "ok");
        assert_eq!(p.cli.answer(Duration::from_secs(30)), "ok");
    }
    assert_eq!(p.srv.poll(3, 30000).len(), 3);
    assert_eq!(p.cli.poll(3, 30000).len(), 3);
    assert_eq!(p.srv.distinct("t", 0, len), "{82}");
    assert_eq!(p.cli.distinct("t", 0, len), "{81}");
}

pub fn dropped_send_buffers_are_unmapped_by_the_peer(p: &mut Pair) {
    p.srv.reg("r", 4096, "lw", 0);
    let base: u64 = p.srv.ok("maps")[0].parse().unwrap();
    for i in 0..5 {
        p.srv.ok(&format!("recv r 0 64 {i}"));
        p.cli.reg(&format!("b{i}"), 4096, "none", i);
        p.cli.ok(&format!("post send b{i} 0 8 {i}"));
        assert_eq!(p.cli.poll(1, 5000).len(), 1);
        p.cli.ok(&format!("drop b{i}"));
    }
    assert_eq!(p.srv.poll(5, 5000).len(), 5);
    let after: u64 = p.srv.ok("maps")[0].parse().unwrap();
    // shm: each new exposure first retires the dropped ones, so only the
    // last buffer is still mapped (until the next exposure or the end of the
    // connection); tcp never maps peer memory.
    let expect_extra = if p.t == Transport::Shm { 1 } else { 0 };
    assert_eq!(
        after,
        base + expect_extra,
        "peer still maps our dropped buffers"
    );
}

pub fn idle_connection_blocks_instead_of_spinning(p: &mut Pair) {
    // Traffic first, so the spin budget has grown, then silence.
    p.srv.reg("r", 4096, "lw", 0);
    p.srv.ok("recv r 0 64 1");
    p.cli.reg("s", 4096, "none", 1);
    p.cli.ok("post send s 0 8 1");
    assert_eq!(p.cli.poll(1, 5000).len(), 1);
    std::thread::sleep(Duration::from_millis(200));
    let (s0, c0) = (p.srv.cpu_ms(), p.cli.cpu_ms());
    std::thread::sleep(Duration::from_millis(1500));
    let (s1, c1) = (p.srv.cpu_ms(), p.cli.cpu_ms());
    assert!(
        s1 - s0 < 150 && c1 - c0 < 150,
        "idle peers used {} ms and {} ms of CPU in 1.5 s",
        s1 - s0,
        c1 - c0
    );
    // and the blocked side still wakes up for the next message
    p.srv.ok("recv r 0 64 2");
    p.cli.ok("post send s 0 8 2");
    assert_eq!(p.cli.poll(1, 5000), ["2,ok,Send,8,-"]);
    assert_eq!(p.srv.poll(2, 5000).len(), 2);
}

pub fn bulk_transfer_checksum_matches(p: &mut Pair, total: u64) {
    let chunk = 4u64 << 20;
    p.srv.reg("r", 16 * chunk, "lw", 0);
    p.cli.reg("s", 4 * chunk, "none", 0);
    p.cli.ok(&format!("pattern s {chunk}"));
    p.srv.send(&format!("sink r {chunk} {total}"));
    let src = p.cli.ok(&format!("source s {chunk} {total}"));
    let sink = p.srv.answer(Duration::from_secs(120));
    let sink: Vec<&str> = sink.split_whitespace().collect();
    assert_eq!(sink[0], "ok", "{sink:?}");
    assert_eq!(sink[2], total.to_string());
    assert_eq!(src[1], total.to_string());
    assert_eq!(
        sink[1], src[0],
        "checksum of everything received equals checksum of everything sent"
    );
    eprintln!(
        "{:?}: {total} bytes in {} s (sender) / {} s (receiver, incl. hashing)",
        p.t, src[2], sink[3]
    );
}

macro_rules! suite {
    ($m:ident, $t:expr) => {
        mod $m {
            use super::*;
            suite!(@t $t, send_and_send_with_imm_deliver_payload_and_immediate, rdma_write_lands_and_write_with_imm_consumes_a_receive,
                rdma_read_returns_target_memory, forged_rkey_and_out_of_bounds_are_remote_access_errors_and_target_untouched,
                access_flags_are_enforced_by_the_target, deregistration_revokes_remote_access_at_once,
                receive_problems_give_local_errors_at_the_target_and_remote_operation_at_the_sender,
                local_errors_complete_in_order_without_touching_the_wire, send_waits_for_a_posted_receive,
                unsignaled_sends_complete_silently_unless_they_fail, cq_notification_fires_once_per_arming,
                peer_destroying_its_qp_terminates_ours_and_flushes, closing_the_access_layer_tells_the_peer,
                port_reset_clears_the_ports_queue_pairs, killed_peer_mid_transfer_flushes_and_does_not_hang,
                idle_connection_blocks_instead_of_spinning, simultaneous_large_writes_in_both_directions_do_not_deadlock,
                dropped_send_buffers_are_unmapped_by_the_peer);

            #[test]
            fn allowlist_refuses_unlisted_peer_at_directory_and_at_endpoint() {
                super::allowlist_refusal($t);
            }
        }
    };
    (@t $t:expr, $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let mut p = pair($t);
                super::$name(&mut p);
            }
        )*
    };
}

suite!(shm, Transport::Shm);
suite!(tcp, Transport::Tcp);

#[test]
fn shm_moves_one_gib_between_processes_with_matching_checksum() {
    let mut p = pair(Transport::Shm);
    bulk_transfer_checksum_matches(&mut p, 1 << 30);
}

#[test]
fn tcp_moves_64_mib_between_processes_with_matching_checksum() {
    let mut p = pair(Transport::Tcp);
    bulk_transfer_checksum_matches(&mut p, 64 << 20);
}

/// A directory that answers lookups as if the caller were "cli": lets an
/// intruder reach the endpoint itself, which must refuse it on its own.
struct LyingDirectory(interconnect::DirectoryClient);

impl interconnect::Directory for LyingDirectory {
    fn claim(&self, name: &str) -> interconnect::Result<()> {
        self.0.claim(name)
    }
    fn register(
        &self,
        ep: interconnect::Endpoint,
    ) -> interconnect::Result<interconnect::ListenerKey> {
        self.0.register(ep)
    }
    fn withdraw(&self, name: &str) -> interconnect::Result<()> {
        self.0.withdraw(name)
    }
    fn unregister(&self, name: &str) -> interconnect::Result<()> {
        self.0.unregister(name)
    }
    fn key(&self, name: &str) -> interconnect::Result<interconnect::ListenerKey> {
        self.0.key(name)
    }
    fn resolve(&self, _from: &str, to: &str) -> interconnect::Result<interconnect::Resolved> {
        self.0.resolve("cli", to)
    }
}

pub fn allowlist_refusal(t: Transport) {
    use interconnect::*;
    use std::sync::Arc;
    let path = dir_path();
    let _dir = DirectoryServer::serve(&path).unwrap();
    let mut srv = Proc::spawn(&path, "svc-host", None);
    srv.ok("listen svc cli");
    srv.send("accept 10000");
    // 1. The directory refuses to resolve for a name not on the allowlist.
    let mut intruder = Proc::spawn(&path, "intruder", None);
    let r = intruder.cmd(&format!("connect svc {}", tname(t)));
    assert!(
        r.starts_with("err connection refused") && r.contains("not on the allowlist"),
        "{r}"
    );
    // 2. Bypassing the directory, the endpoint itself refuses.
    let ctx = Context::open(
        "intruder",
        Arc::new(LyingDirectory(DirectoryClient::new(&path))),
        ContextOptions::default(),
    )
    .unwrap();
    let pd = ctx.alloc_pd().unwrap();
    let cq = ctx.create_cq(16).unwrap();
    let qp = ctx.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
    match ctx.connect(&qp, "svc", Some(t), Duration::from_secs(5)) {
        Err(IcError::Refused(m)) => assert!(m.contains("not on the allowlist"), "{m}"),
        other => panic!("endpoint accepted an unlisted peer: {:?}", other.err()),
    }
    assert_eq!(qp.state(), QpState::Init);
    // 3. The listener is still waiting and accepts the listed peer.
    let mut cli = Proc::spawn(&path, "cli", None);
    cli.ok(&format!("connect svc {}", tname(t)));
    assert_eq!(srv.answer(Duration::from_secs(10)), "ok cli");
}

#[test]
fn tcp_across_two_network_namespaces_joined_by_veth_passes_the_suite() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        partvisor_runtime::ci::environment_missing("not root, cannot create network namespaces");
        return;
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        partvisor_runtime::ci::environment_missing("`ip` (iproute2) is not installed");
        return;
    }
    let (ns, ipa, ipb) = Netns::create().expect("create namespaces and veth");
    let nets = [(ns.a.as_str(), ipa.as_str()), (ns.b.as_str(), ipb.as_str())];
    let before = ns.rx_bytes();
    type Scenario = fn(&mut Pair);
    let scenarios: [(&str, Scenario); 12] = [
        ("send", send_and_send_with_imm_deliver_payload_and_immediate),
        (
            "write",
            rdma_write_lands_and_write_with_imm_consumes_a_receive,
        ),
        ("read", rdma_read_returns_target_memory),
        (
            "forged",
            forged_rkey_and_out_of_bounds_are_remote_access_errors_and_target_untouched,
        ),
        ("access", access_flags_are_enforced_by_the_target),
        ("dereg", deregistration_revokes_remote_access_at_once),
        (
            "recv errors",
            receive_problems_give_local_errors_at_the_target_and_remote_operation_at_the_sender,
        ),
        ("rnr", send_waits_for_a_posted_receive),
        ("notify", cq_notification_fires_once_per_arming),
        (
            "peer destroy",
            peer_destroying_its_qp_terminates_ours_and_flushes,
        ),
        ("killed", killed_peer_mid_transfer_flushes_and_does_not_hang),
        ("bulk", |p| bulk_transfer_checksum_matches(p, 32 << 20)),
    ];
    for (name, f) in scenarios {
        eprintln!("netns scenario: {name}");
        let mut p = pair_with(Transport::Tcp, Some(nets));
        f(&mut p);
    }
    let crossed = ns.rx_bytes() - before;
    assert!(
        crossed > 32 << 20,
        "the traffic must have crossed the veth ({crossed} bytes seen)"
    );
}

#[test]
fn location_transparency_picks_shm_for_a_peer_on_the_same_host() {
    let path = dir_path();
    let _dir = interconnect::DirectoryServer::serve(&path).unwrap();
    let mut srv = Proc::spawn(&path, "svc-host", None);
    let mut cli = Proc::spawn(&path, "cli", None);
    srv.ok("listen svc cli");
    srv.send("accept 10000");
    assert_eq!(cli.ok("connect svc auto"), ["Some(Shm)"]);
    assert_eq!(srv.answer(Duration::from_secs(10)), "ok cli");
}
