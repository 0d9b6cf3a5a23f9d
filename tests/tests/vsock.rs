//! Guest sockets between partitions started through partctl (issue 11):
//! partd grants each `[vsock]` partition a CID in the start transaction,
//! runs the host's one `part-io vsock`, gives it every partition's
//! directory entry (policy from the definitions) and takes it out at stop.
//!
//! `PARTVISOR_VSOCK_TEST_BYTES` sets the bytes each direction carries
//! (default 1G, as the issue asks).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use partvisor_e2e::{console_of, vm_lock, wait_console, Partd};
use partvisor_test_guest::vsock_host;

const BOOT: Duration = Duration::from_secs(90);
/// Generous: a debug-built part-io relays about 100 MB/s here.
const TRANSFER: Duration = Duration::from_secs(300);

fn test_bytes() -> String {
    std::env::var("PARTVISOR_VSOCK_TEST_BYTES").unwrap_or_else(|_| "1G".into())
}

/// A size as the guest's words take it (`64K`, `1G`, ...).
fn bytes_of(text: &str) -> u64 {
    partvisor_test_guest::words::memparse(text).unwrap()
}

/// One request to the host's vsock relay (its control socket).
fn relay(partd: &Partd, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(partd.path().join("vsock/run/control.sock")).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn port_stats(partd: &Partd, cid: u64) -> serde_json::Value {
    let st = relay(partd, r#"{"op":"stats"}"#);
    st["stats"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["cid"] == cid)
        .unwrap_or_else(|| panic!("no port for CID {cid} in {st}"))
        .clone()
}

/// The `sum=` of the console line that starts with `prefix`.
fn sum_after(console: &str, prefix: &str) -> String {
    let line = console
        .lines()
        .find(|l| l.contains(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} on the console:\n{console}"));
    line.rsplit("sum=").next().unwrap().trim().to_string()
}

const VSOCK_DB: &str = "[vsock]\naccept = [{ from = \"web\", ports = [5000, 5001] }]\n";
const VSOCK: &str = "[vsock]\n";

#[test]
fn two_partitions_exchange_a_gigabyte_both_ways_and_a_third_not_on_the_allowlist_is_refused() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    let bytes = test_bytes();
    let n = bytes_of(&bytes);
    let db = partd.definition_with(
        "db",
        &format!("vsock=listen:5000:{bytes}:{bytes} stay"),
        VSOCK_DB,
    );
    let web = partd.definition_with(
        "web",
        &format!("vsock=send:{{cid:db}}:5000:{bytes}:{bytes} stay"),
        VSOCK,
    );
    let intruder = partd.definition_with("intruder", "vsock=send:{cid:db}:5000:1K", VSOCK);
    for d in [&db, &web, &intruder] {
        partd.ctl_ok(&["create", d.to_str().unwrap()]);
    }
    // web names db's CID: before db runs it has none.
    let err = partd.ctl_err(&["start", "web"]);
    assert!(
        err.contains("{cid:db}: no such partition, or it is not running"),
        "{err}"
    );

    let vdb = partd.ctl_json(&["start", "db"]);
    let db_cid = vdb["holdings"]["vsock_cids"][0].as_u64().unwrap();
    assert!(db_cid >= 3, "{vdb}");
    let io = vdb["io"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["kind"] == "vsock")
        .unwrap_or_else(|| panic!("no part-io vsock in {vdb}"));
    assert_eq!(io["alive"], true);
    let shown = partd.ctl_ok(&["show", "db"]);
    assert!(shown.contains("vsock cids"), "{shown}");
    assert!(shown.contains(&format!("[{db_cid}]")), "{shown}");
    wait_console(&console_of(&vdb), "vsock: listening on port 5000", BOOT);

    let t0 = Instant::now();
    let vweb = partd.ctl_json(&["start", "web"]);
    let web_cid = vweb["holdings"]["vsock_cids"][0].as_u64().unwrap();
    assert_ne!(web_cid, db_cid, "one CID per partition");
    assert_eq!(
        vweb["io"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["kind"] == "vsock")
            .unwrap()["pid"],
        io["pid"],
        "one relay per host"
    );
    let got_db = wait_console(&console_of(&vdb), "stay: idle", TRANSFER);
    let got_web = wait_console(&console_of(&vweb), "stay: idle", TRANSFER);
    let secs = t0.elapsed().as_secs_f64();
    let recv = format!("vsock: received {n} bytes from {web_cid}:");
    let sent = format!("vsock: sent {n} bytes to {db_cid}:5000");
    assert!(got_db.contains(&recv), "{got_db}");
    assert!(got_web.contains(&sent), "{got_web}");
    assert_eq!(
        sum_after(&got_db, &recv),
        sum_after(&got_web, &sent),
        "web -> db checksum"
    );
    assert_eq!(
        sum_after(
            &got_web,
            &format!("vsock: received {n} bytes from {db_cid}:5000")
        ),
        sum_after(&got_db, &format!("vsock: sent {n} bytes to {web_cid}:")),
        "db -> web checksum"
    );
    eprintln!(
        "{bytes} each way at once in {secs:.1} s (boot included): {:.0} MB/s total",
        2.0 * n as f64 / secs / 1e6
    );
    let ws = port_stats(&partd, web_cid);
    assert_eq!(
        ws["lookups"], 1,
        "one directory lookup per connection: {ws}"
    );
    assert!(ws["tx_bytes"].as_u64().unwrap() >= n, "{ws}");

    // Not on db's allowlist: a reset, logged and counted.
    let vi = partd.ctl_json(&["start", "intruder"]);
    let intruder_cid = vi["holdings"]["vsock_cids"][0].as_u64().unwrap();
    let text = wait_console(&console_of(&vi), "refused", BOOT);
    assert!(
        text.contains(&format!("vsock: connect to {db_cid}:5000 refused")),
        "{text}"
    );
    let is = port_stats(&partd, intruder_cid);
    assert_eq!(is["refused"], 1, "{is}");
    let log = std::fs::read_to_string(partd.path().join("vsock/vsock.log")).unwrap();
    assert!(
        log.contains("does not accept this partition on that port"),
        "{log}"
    );
    let _ = partd.wait_state("intruder", "failed", BOOT);
    for p in ["web", "db"] {
        partd.ctl_ok(&["stop", p, "--force"]);
    }
    // Every CID is back in the resource map.
    let free = partd.view().free().unwrap().vsock_cids;
    assert_eq!(free.free, free.total, "{free:?}");
}

#[test]
fn when_the_listener_stops_its_peer_is_reset_within_a_second_and_the_cid_waits_for_the_relay() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    let db = partd.definition_with("db", "vsock=listen:5001:1000G stay", VSOCK_DB);
    let web = partd.definition_with("web", "vsock=send:{cid:db}:5001:1000G", VSOCK);
    for d in [&db, &web] {
        partd.ctl_ok(&["create", d.to_str().unwrap()]);
    }
    let vdb = partd.ctl_json(&["start", "db"]);
    let db_cid = vdb["holdings"]["vsock_cids"][0].as_u64().unwrap();
    wait_console(&console_of(&vdb), "vsock: listening on port 5001", BOOT);
    let vweb = partd.ctl_json(&["start", "web"]);
    let web_cid = vweb["holdings"]["vsock_cids"][0].as_u64().unwrap();
    // Streaming: bytes move.
    let deadline = Instant::now() + BOOT;
    while port_stats(&partd, web_cid)["tx_bytes"].as_u64().unwrap() < 1 << 20 {
        assert!(Instant::now() < deadline, "web never streamed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Watch web's console for the reset while db is stopped.
    let mut console = UnixStream::connect(console_of(&vweb)).unwrap();
    console
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let watcher = std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let t0 = Instant::now();
        while !text.contains("vsock: connection reset") && t0.elapsed() < BOOT {
            match console.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => {}
            }
        }
        (Instant::now(), text)
    });
    let stopped = partd.ctl_json(&["stop", "db", "--force"]);
    let stop_returned = Instant::now();
    assert_eq!(stopped["state"], "stopped");
    let (seen, text) = watcher.join().unwrap();
    assert!(text.contains("vsock: connection reset"), "{text}");
    let after_stop = seen.saturating_duration_since(stop_returned);
    eprintln!("web saw the reset {after_stop:?} after db's stop returned");
    assert!(
        after_stop < Duration::from_secs(1),
        "reset {after_stop:?} after the stop"
    );
    // db's CID went back only after the relay let go of it.
    let log = partd.log();
    let removed = log
        .find(&format!("db: vsock CID {db_cid} removed"))
        .unwrap_or_else(|| panic!("no removal in partd's log:\n{log}"));
    let released = log
        .rfind("db: resources released")
        .unwrap_or_else(|| panic!("no release in partd's log:\n{log}"));
    assert!(
        removed < released,
        "the CID was released before the relay let go:\n{log}"
    );
    let r = relay(&partd, &format!(r#"{{"op":"remove","cid":{db_cid}}}"#));
    assert_eq!(r["connected"], false, "{r}");
    assert!(!Path::new(&partd.path().join("vsock/run/db.sock")).exists());
    let _ = partd.wait_state("web", "failed", BOOT);
}

#[test]
fn host_processes_talk_to_a_partition_through_its_hybrid_socket_both_ways() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    let bytes = "16M";
    let n = bytes_of(bytes);
    let svc = partd.definition_with(
        "svc",
        &format!("vsock=send:2:6000:{bytes}:{bytes} vsock=listen:6001:{bytes}:{bytes} stay"),
        VSOCK,
    );
    partd.ctl_ok(&["create", svc.to_str().unwrap()]);
    // The host service the guest connects to: `<host socket>_6000`, in
    // the partition's host directory (made at create). The relay connects
    // as its group (the directory's, setgid): the listener lets it write.
    let dir = partd.path().join("vsock/hosts/svc");
    let listener = std::os::unix::net::UnixListener::bind(dir.join("vsock.sock_6000")).unwrap();
    std::fs::set_permissions(
        dir.join("vsock.sock_6000"),
        std::os::unix::fs::PermissionsExt::from_mode(0o660),
    )
    .unwrap();
    let served = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        vsock_host::exchange(s, n, n, TRANSFER).unwrap()
    });
    let v = partd.ctl_json(&["start", "svc"]);
    let cid = v["holdings"]["vsock_cids"][0].as_u64().unwrap();
    let ex = served.join().unwrap();
    let text = wait_console(&console_of(&v), "vsock: listening on port 6001", BOOT);
    assert!(
        text.contains(&format!("vsock: sent {n} bytes to 2:6000 in")),
        "{text}"
    );
    assert_eq!(ex.received_bytes, n);
    assert_eq!(
        sum_after(&text, "bytes to 2:6000"),
        ex.received,
        "guest -> host"
    );
    assert_eq!(
        sum_after(&text, "bytes from 2:6000"),
        ex.sent,
        "host -> guest"
    );

    // And the other way: a host process opens the connection.
    let (s, host_port) = vsock_host::connect(&dir.join("vsock.sock"), 6001).unwrap();
    assert!(host_port >= 1 << 30, "host port {host_port}");
    let ex = vsock_host::exchange(s, n, n, TRANSFER).unwrap();
    assert_eq!(ex.received_bytes, n);
    let text = wait_console(&console_of(&v), "stay: idle", BOOT);
    let from = format!("bytes from 2:{host_port}");
    assert_eq!(sum_after(&text, &from), ex.sent, "host -> guest");
    assert_eq!(
        sum_after(&text, &format!("bytes to 2:{host_port}")),
        ex.received,
        "guest -> host"
    );
    let st = port_stats(&partd, cid);
    assert_eq!(st["host_connections"], 2, "{st}");
    assert_eq!(st["guest_to_host_bytes"], 2 * n, "{st}");
    assert_eq!(st["host_to_guest_bytes"], 2 * n, "{st}");
    assert_eq!(st["host_resets"], 0, "{st}");
    partd.ctl_ok(&["stop", "svc", "--force"]);
    assert!(
        !dir.join("vsock.sock").exists(),
        "host socket removed at stop"
    );
}
