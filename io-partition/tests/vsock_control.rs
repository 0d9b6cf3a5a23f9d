//! `part-io vsock --control`: partitions added and removed at run time
//! over the control socket, as partd does, with policy by partition name.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::vsock::*;
use common::*;

fn spawn_controlled() -> PartIo {
    let dir = tempfile::tempdir().unwrap();
    let args = vec![
        "vsock".to_string(),
        "--control".into(),
        dir.path().join("control.sock").display().to_string(),
    ];
    PartIo::spawn_args(dir, &args, 1)
}

fn request(p: &PartIo, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(p.dir.path().join("control.sock")).unwrap();
    // The server may refuse and close before a long line is all written (a
    // line over the limit is answered as soon as the limit is passed): the
    // reply is still there to read.
    let sent = s
        .write_all(line.as_bytes())
        .and_then(|()| s.write_all(b"\n"));
    if let Err(e) = sent {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply}"))
}

fn socket(p: &PartIo, name: &str) -> PathBuf {
    p.dir.path().join(format!("{name}.sock"))
}

fn add(p: &PartIo, cid: u32, name: &str, accept: &str) -> serde_json::Value {
    request(
        p,
        &format!(
            r#"{{"op":"add","cid":{cid},"partition":"{name}","socket":"{}","accept":[{accept}]}}"#,
            socket(p, name).display()
        ),
    )
}

fn attached(p: &PartIo, name: &str, ready_before: usize) -> Guest {
    let g = Guest::attach_at(&socket(p, name));
    let deadline = Instant::now() + TIMEOUT;
    while p.log().matches("vsock receive queue ready").count() <= ready_before {
        assert!(Instant::now() < deadline, "no receive queue:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    g
}

const WEB: (u64, u32) = (4, 2000);
const DB: (u64, u32) = (3, 5432);

#[test]
fn partitions_added_over_the_control_socket_connect_by_name_policy() {
    let p = spawn_controlled();
    let mode = std::fs::metadata(p.dir.path().join("control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket is owner-only");
    assert_eq!(
        add(&p, 3, "db", r#"{"from":"web","ports":[5432]}"#)["ok"],
        true
    );
    assert_eq!(add(&p, 4, "web", "")["ok"], true);
    let mut db = attached(&p, "db", 0);
    let mut web = attached(&p, "web", 1);
    assert_eq!((db.config_cid(), web.config_cid()), (3, 4));
    web.send(Hdr::new(REQUEST, WEB, DB), &[]);
    assert_eq!(db.recv().0, Hdr::new(REQUEST, WEB, DB));
    db.send(Hdr::new(RESPONSE, DB, WEB), &[]);
    assert_eq!(web.recv().0.op, RESPONSE);
    web.send(Hdr::new(RW, WEB, DB), b"select 1");
    let (h, data) = db.recv();
    assert_eq!((h.op, data.as_slice()), (RW, &b"select 1"[..]));
    // db never accepted web on another port, nor db on web at all.
    web.send(Hdr::new(REQUEST, (4, 2001), (3, 22)), &[]);
    assert_eq!(web.recv().0.op, RST);
    db.send(Hdr::new(REQUEST, DB, (4, 80)), &[]);
    assert_eq!(db.recv().0.op, RST);
    let stats = request(&p, r#"{"op":"stats"}"#);
    let ports = stats["stats"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2);
    let web_stats = ports.iter().find(|x| x["cid"] == 4).unwrap();
    assert_eq!(web_stats["lookups"], 2, "{web_stats}");
    assert_eq!(web_stats["connected"], true);

    // Removing db resets web's connection at once and stops db's socket.
    let t0 = Instant::now();
    let r = request(&p, r#"{"op":"remove","cid":3}"#);
    assert_eq!(
        (&r["ok"], &r["reset"], &r["connected"]),
        (&true.into(), &1.into(), &true.into()),
        "{r}"
    );
    let (h, _) = web
        .recv_timeout(Duration::from_secs(1))
        .expect("no reset within a second of the remove");
    assert_eq!((h.op, h.src, h.dst), (RST, DB, WEB));
    eprintln!("reset {:?} after the remove", t0.elapsed());
    assert!(!socket(&p, "db").exists(), "db's socket is gone");
    // CID 3 is no longer anyone's: web's request is refused.
    web.send(Hdr::new(REQUEST, WEB, DB), &[]);
    assert_eq!(web.recv().0.op, RST);
    // Until db's frontend lets go, a remove says it is still attached.
    let r = request(&p, r#"{"op":"remove","cid":3}"#);
    assert_eq!(r["connected"], true, "{r}");
    drop(db);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = request(&p, r#"{"op":"remove","cid":3}"#);
        if r["connected"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "db never let go: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Now CID 3 may go to another partition, which inherits nothing: web
    // is not on its (empty) allowlist.
    assert_eq!(add(&p, 3, "other", "")["ok"], true);
    let _other = attached(&p, "other", 2);
    web.send(Hdr::new(REQUEST, WEB, DB), &[]);
    assert_eq!(web.recv().0.op, RST);
    assert!(p.log().contains("not accept"), "{}", p.log());
}

#[test]
fn bad_control_requests_are_refused_and_change_nothing() {
    let p = spawn_controlled();
    assert_eq!(add(&p, 3, "db", "")["ok"], true);
    let refused = |r: serde_json::Value, want: &str| {
        assert_eq!(r["ok"], false, "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(want), "{e} should mention {want}");
    };
    refused(add(&p, 3, "web", ""), "CID 3 is held by partition db");
    refused(add(&p, 2, "host", ""), "not a guest CID");
    refused(
        request(
            &p,
            &format!(
                r#"{{"op":"add","cid":5,"partition":"x","socket":"{}"}}"#,
                socket(&p, "db").display()
            ),
        ),
        "used by two ports",
    );
    refused(
        request(
            &p,
            r#"{"op":"add","cid":6,"partition":"far","socket":"/x","location":{"kind":"remote","host":"h2"}}"#,
        ),
        "remote partition is not served here",
    );
    refused(
        request(&p, r#"{"op":"add","cid":7,"partition":"nosock"}"#),
        "needs a socket",
    );
    refused(request(&p, r#"{"op":"shutdown"}"#), "bad request");
    refused(request(&p, &"x".repeat(70_000)), "too long");
    // Same partition and socket again: an update of its policy.
    assert_eq!(
        add(&p, 3, "db", r#"{"from":"web","ports":[1]}"#)["ok"],
        true
    );
    let stats = request(&p, r#"{"op":"stats"}"#);
    assert_eq!(stats["stats"]["ports"].as_array().unwrap().len(), 1);
    // A client that connects and says nothing holds the socket for at most
    // the client timeout.
    let _silent = UnixStream::connect(p.dir.path().join("control.sock")).unwrap();
    let t0 = Instant::now();
    assert_eq!(request(&p, r#"{"op":"stats"}"#)["ok"], true);
    assert!(t0.elapsed() < Duration::from_secs(10));
}
