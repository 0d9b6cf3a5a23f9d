//! Hostile-peer tests: the attacker is a separate process speaking the shm
//! protocol with raw system calls (`ic-peer hostile-shm`, which uses neither
//! `interconnect` nor `channels`). The target is an ordinary `ic-peer`.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::time::Duration;

use common::*;
use interconnect::{Directory, DirectoryClient, DirectoryServer};

struct Scene {
    _dir: DirectoryServer,
    srv: Proc,
    h: Proc,
}

/// A target listening as "svc" (allowing "cli") and a hostile process
/// connected to it as "cli". `setup` runs on the target before it accepts.
fn scene(setup: impl FnOnce(&mut Proc)) -> Scene {
    let path = dir_path();
    let dir = DirectoryServer::serve(&path).unwrap();
    let mut srv = Proc::spawn(&path, "svc-host", None);
    setup(&mut srv);
    srv.ok("listen svc cli");
    srv.send("accept 10000");
    let r = DirectoryClient::new(&path).resolve("cli", "svc").unwrap();
    let mut h = Proc::hostile();
    let sock = r.endpoint.shm_path.clone().unwrap();
    let refused = h.cmd(&format!("hello {} intruder svc", sock.display()));
    assert!(
        refused.starts_with("err refused") && refused.contains("not on the allowlist"),
        "{refused}"
    );
    // Claiming the allowlisted name is not enough: without the pair's
    // secret (none, or a made-up one) the endpoint refuses.
    for forged in ["", &"ab".repeat(32)] {
        let refused = h.cmd(&format!("hello {} cli svc {forged}", sock.display()));
        assert!(
            refused.starts_with("err refused") && refused.contains("no proof"),
            "{refused}"
        );
    }
    h.ok(&format!(
        "hello {} cli svc {}",
        sock.display(),
        secret_hex(&r)
    ));
    assert_eq!(srv.answer(Duration::from_secs(10)), "ok cli");
    Scene { _dir: dir, srv, h }
}

#[test]
fn raw_syscall_peer_cannot_reach_unregistered_read_only_or_revoked_memory() {
    let mut keys = Vec::new();
    let mut s = scene(|srv| {
        keys.push(srv.reg("rw", 4096, "lw,rw,rr", 0x11));
        keys.push(srv.reg("ro", 4096, "rr", 0x22));
        keys.push(srv.reg("dead", 4096, "lw,rw,rr", 0x33));
        keys.push(srv.reg("secret", 4096, "lw", 0x44));
        srv.ok("dereg dead");
    });
    let (rw, ro, dead, secret) = (keys[0], keys[1], keys[2], keys[3]);
    s.h.ok("expose 7 4096 238 1");
    let status = |h: &mut Proc, c: &str| -> String { h.ok(c)[1].clone() };
    // Forged rkeys, including the rkey-space neighbours of a real one.
    for forged in [rw ^ 1, rw.wrapping_add(1), 0, u32::MAX, ro ^ rw] {
        if [rw, ro, secret].contains(&forged) {
            continue;
        }
        assert_eq!(
            status(&mut s.h, &format!("write {forged} 0 16 7 0")),
            "3",
            "forged rkey {forged}"
        );
        assert_eq!(status(&mut s.h, &format!("read {forged} 0 16")), "3");
    }
    // A region exposed for remote read only, and a local-only region.
    assert_eq!(status(&mut s.h, &format!("write {ro} 0 16 7 0")), "3");
    assert_eq!(status(&mut s.h, &format!("write {secret} 0 16 7 0")), "3");
    assert_eq!(status(&mut s.h, &format!("read {secret} 0 16")), "3");
    // Keeps using a region after deregistration.
    assert_eq!(status(&mut s.h, &format!("write {dead} 0 16 7 0")), "3");
    assert_eq!(status(&mut s.h, &format!("read {dead} 0 16")), "3");
    // Valid rkey, out of bounds (and an offset that overflows).
    assert_eq!(status(&mut s.h, &format!("write {rw} 4090 16 7 0")), "3");
    assert_eq!(
        status(&mut s.h, &format!("write {rw} {} 16 7 0", u64::MAX - 8)),
        "3"
    );
    assert_eq!(status(&mut s.h, &format!("read {rw} 0 5000")), "3");
    // Lying about its own source: past the end of what it exposed, or a
    // buffer it never exposed. The target refuses and does not fault.
    assert_eq!(status(&mut s.h, &format!("write {rw} 0 16 7 4090")), "4");
    assert_eq!(status(&mut s.h, &format!("write {rw} 0 16 99 0")), "4");
    // Every target region is intact.
    assert_eq!(s.srv.distinct("rw", 0, 4096), "{17}");
    assert_eq!(s.srv.distinct("ro", 0, 4096), "{34}");
    assert_eq!(s.srv.distinct("dead", 0, 4096), "{51}");
    assert_eq!(s.srv.distinct("secret", 0, 4096), "{68}");
    // The one legitimate access works and lands exactly where it should.
    assert_eq!(status(&mut s.h, &format!("write {rw} 8 16 7 0")), "0");
    assert_eq!(s.srv.distinct("rw", 8, 16), "{238}");
    assert_eq!(s.srv.distinct("rw", 24, 4072), "{17}");
    // The target's read window was handed over sealed: no write access by
    // mmap, mprotect or write(2), no unsealing, no truncation.
    assert_eq!(
        s.h.ok("window_rw"),
        [
            "mmap_rw=false",
            "map_ro=true",
            "mprotect=-1",
            "pwrite=-1",
            "add_seals=-1",
            "truncate=-1"
        ]
    );
    // A response that matches no request: bad response, QP torn down.
    s.srv.reg("d", 4096, "lw", 0);
    s.srv.ok("post read d 0 16 77 1 0");
    assert_eq!(s.h.ok("answer_wrong"), ["kind=3"]);
    assert_eq!(s.srv.poll(1, 5000), ["77,bad_resp,RdmaRead,0,-"]);
    let ev = s.srv.ok("event 5000").join(" ");
    assert!(ev.starts_with("PeerLost"), "{ev}");
    assert_eq!(s.srv.distinct("d", 0, 4096), "{0}");
}

#[test]
fn raw_syscall_peer_offering_unsealed_memory_is_cut_off() {
    let mut s = scene(|srv| {
        srv.reg("rw", 4096, "lw,rw", 0x11);
    });
    // An unsealed memfd could be truncated under the target's mapping (SIGBUS).
    s.h.ok("expose 1 4096 0 0");
    let ev = s.srv.ok("event 5000").join(" ");
    assert!(ev.starts_with("PeerLost") && ev.contains("seals"), "{ev}");
    assert!(s.srv.ok("state").join(" ").starts_with("in error"));
    assert_eq!(
        s.srv.distinct("rw", 0, 4096),
        "{17}",
        "target alive and intact"
    );
}

#[test]
fn raw_syscall_peer_forging_ring_indices_is_cut_off() {
    let mut s = scene(|srv| {
        srv.reg("rw", 4096, "lw,rw", 0x11);
    });
    s.h.ok("forge_tail");
    let ev = s.srv.ok("event 5000").join(" ");
    assert!(ev.starts_with("PeerLost") && ev.contains("ring"), "{ev}");
    assert_eq!(s.srv.distinct("rw", 0, 4096), "{17}");
}

#[test]
fn raw_tcp_peer_cannot_reach_unregistered_read_only_or_revoked_memory() {
    let path = dir_path();
    let _dir = DirectoryServer::serve(&path).unwrap();
    let mut srv = Proc::spawn(&path, "svc-host", None);
    let rw = srv.reg("rw", 4096, "lw,rw,rr", 0x11);
    let ro = srv.reg("ro", 4096, "rr", 0x22);
    let dead = srv.reg("dead", 4096, "lw,rw,rr", 0x33);
    let secret = srv.reg("secret", 4096, "lw", 0x44);
    srv.ok("dereg dead");
    srv.ok("listen svc cli");
    srv.send("accept 10000");
    let r = DirectoryClient::new(&path).resolve("cli", "svc").unwrap();
    let addr = r.endpoint.tcp_addr.unwrap();
    let mut h = Proc::hostile();
    let refused = h.cmd(&format!("hello_tcp {addr} intruder svc"));
    assert!(
        refused.starts_with("err refused") && refused.contains("not on the allowlist"),
        "{refused}"
    );
    // A TCP peer that claims the allowlisted name without the pair's
    // secret is refused; one whose secret belongs to another listener too.
    let decoy = DirectoryClient::new(&path);
    let decoy_key = interconnect::Directory::register(
        &decoy,
        interconnect::Endpoint {
            name: "decoy".into(),
            host_id: "h".into(),
            shm_path: None,
            tcp_addr: None,
            allow: vec!["cli".into()],
        },
    )
    .unwrap();
    let other_pair = decoy.resolve("cli", "decoy").unwrap();
    assert_eq!(other_pair.secret, decoy_key.pair_secret("cli"));
    for forged in [String::new(), "00".repeat(32), secret_hex(&other_pair)] {
        let refused = h.cmd(&format!("hello_tcp {addr} cli svc {forged}"));
        assert!(
            refused.starts_with("err refused") && refused.contains("no proof"),
            "{forged}: {refused}"
        );
    }
    h.ok(&format!("hello_tcp {addr} cli svc {}", secret_hex(&r)));
    assert_eq!(srv.answer(Duration::from_secs(10)), "ok cli");
    let status = |h: &mut Proc, c: &str| -> String { h.ok(c)[1].clone() };
    for forged in [rw ^ 1, rw.wrapping_add(1), 0, u32::MAX] {
        if [rw, ro, secret].contains(&forged) {
            continue;
        }
        assert_eq!(status(&mut h, &format!("write {forged} 0 16")), "3");
        assert_eq!(status(&mut h, &format!("read {forged} 0 16")), "3");
    }
    assert_eq!(status(&mut h, &format!("write {ro} 0 16")), "3");
    assert_eq!(status(&mut h, &format!("write {secret} 0 16")), "3");
    assert_eq!(status(&mut h, &format!("read {secret} 0 16")), "3");
    assert_eq!(status(&mut h, &format!("write {dead} 0 16")), "3");
    assert_eq!(status(&mut h, &format!("read {dead} 0 16")), "3");
    assert_eq!(status(&mut h, &format!("write {rw} 4090 16")), "3");
    assert_eq!(
        status(&mut h, &format!("read {rw} {} 16", u64::MAX - 8)),
        "3"
    );
    assert_eq!(srv.distinct("rw", 0, 4096), "{17}");
    assert_eq!(srv.distinct("ro", 0, 4096), "{34}");
    assert_eq!(srv.distinct("dead", 0, 4096), "{51}");
    assert_eq!(srv.distinct("secret", 0, 4096), "{68}");
    assert_eq!(status(&mut h, &format!("write {rw} 8 16")), "0");
    assert_eq!(srv.distinct("rw", 8, 16), "{238}");
    assert_eq!(srv.distinct("rw", 24, 4072), "{17}");
    // A payload announcement beyond the protocol's limit ends the connection.
    h.ok("lie_len");
    let ev = srv.ok("event 5000").join(" ");
    assert!(
        ev.starts_with("PeerLost") && ev.contains("oversized"),
        "{ev}"
    );
}
