//! partd's API boundary: who may use it (SO_PEERCRED) and what malformed
//! requests get. No guest is booted here.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use partvisor_e2e::{bins, Partd};

/// Sends raw bytes as one HTTP exchange; returns (status, body) or `None`
/// when partd closed the connection without a status line.
fn exchange(socket: &Path, raw: &[u8]) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn request(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: partd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(socket, raw.as_bytes()).unwrap_or_else(|| panic!("{method} {path}: no reply"))
}

#[test]
fn malformed_requests_get_4xx_with_a_message_and_partd_keeps_serving() {
    let partd = Partd::start(&[]);
    let s = partd.socket.as_path();
    let kernel = partvisor_e2e::guest().display().to_string();
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("POST", "/v1/partitions", "{bad".into(), 400, "not valid"),
        (
            "POST",
            "/v1/partitions",
            "[1, 2]".into(),
            400,
            "JSON object",
        ),
        ("POST", "/v1/partitions", "".into(), 400, "not valid"),
        (
            "POST",
            "/v1/partitions",
            format!(r#"{{"name": "x", "memory_mib": "lots", "kernel": "{kernel}"}}"#),
            400,
            "invalid type",
        ),
        (
            "POST",
            "/v1/partitions",
            format!(r#"{{"name": "x", "memory_mib": 8, "kernel": "{kernel}", "colour": 1}}"#),
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/v1/partitions",
            format!(r#"{{"name": "../etc", "memory_mib": 8, "kernel": "{kernel}"}}"#),
            400,
            "invalid partition name",
        ),
        (
            "POST",
            "/v1/partitions",
            r#"{"name": "x", "memory_mib": 8, "kernel": "relative/k"}"#.into(),
            400,
            "absolute path",
        ),
        (
            "GET",
            "/v1/partitions/Bad%20Name",
            String::new(),
            400,
            "invalid partition name",
        ),
        (
            "GET",
            "/v1/partitions/..%2Fetc",
            String::new(),
            400,
            "invalid partition name",
        ),
        (
            "GET",
            "/v1/partitions/absent",
            String::new(),
            404,
            "no partition named absent",
        ),
        (
            "POST",
            "/v1/partitions/absent/stop",
            r#"{"force": "yes"}"#.into(),
            400,
            "invalid type",
        ),
        (
            "POST",
            "/v1/partitions/absent/stop",
            r#"{"forse": true}"#.into(),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/v1/partitions/absent/start",
            "{}".into(),
            404,
            "no partition named",
        ),
        ("GET", "/v1/log?limit=many", String::new(), 400, "limit"),
        (
            "GET",
            "/v2/anything",
            String::new(),
            404,
            "no such API path",
        ),
        (
            "GET",
            "/v1/partitions/absent/console",
            String::new(),
            400,
            "HTTP/1.1 upgrade",
        ),
    ];
    for (method, path, body, want, msg) in &cases {
        let (status, reply) = request(s, method, path, body);
        assert_eq!(status, *want, "{method} {path} {body}: {reply}");
        assert!(
            reply.contains(msg),
            "{method} {path}: {reply:?} lacks {msg:?}"
        );
    }
    // Not HTTP at all: a 400 or a closed connection, never a hang or a crash.
    if let Some((status, _)) = exchange(s, b"\x00\x01\x02 garbage\r\n\r\n") {
        assert_eq!(status, 400);
    }
    // A body larger than 1 MiB is refused.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(1 << 20));
    let (status, reply) = request(s, "POST", "/v1/partitions", &big);
    assert_eq!(status, 413, "{reply}");
    // A client that connects and says nothing does not block the others.
    let _idle = UnixStream::connect(s).unwrap();
    let (status, body) = request(s, "GET", "/v1/partitions", "");
    assert_eq!((status, body.as_str()), (200, "[]"));
    // And nothing was created by any of it.
    assert!(partd.view().partitions().unwrap().is_empty());
}

#[test]
fn allowlisted_uid_is_served_and_another_uid_gets_403() {
    // The socket is 0660 with group `nogroup`; both uids run in that group
    // so they reach the socket and partd's own uid check decides.
    let gid = 65534;
    let partd = Partd::start(&["--group", "nogroup", "--allow-uid", "4242"]);
    std::fs::set_permissions(partd.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let meta = std::fs::metadata(&partd.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);

    let ok = partd.run_as(4242, gid, &["--json", "list"]);
    assert!(
        ok.status.success(),
        "allowlisted uid refused: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ok.stdout).unwrap(),
        serde_json::json!([])
    );

    let refused = partd.run_as(4343, gid, &["--json", "list"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("uid 4343 may not use partd"), "{err}");
    let reply: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(reply["status"], 403, "{reply}");
    // The console goes through the same check.
    let console = partd.run_as(4343, gid, &["--json", "console", "any"]);
    let reply: serde_json::Value = serde_json::from_slice(&console.stdout).unwrap();
    assert_eq!(reply["status"], 403, "{reply}");
    assert!(partd.log().contains("refused API request from uid 4343"));

    // A uid outside the socket's group cannot even connect.
    let outside = partd.run_as(4242, 4242, &["list"]);
    assert!(!outside.status.success());
    assert!(String::from_utf8_lossy(&outside.stderr).contains("cannot reach partd"));

    // root (this test) is always served.
    assert_eq!(partd.ctl_json(&["list"]), serde_json::json!([]));
}

#[test]
fn dev_mode_starts_a_personal_partd_under_home_and_reuses_it() {
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(&bins().partctl)
            .arg("--dev")
            .args(args)
            .env("HOME", home.path())
            .env_remove("XDG_STATE_HOME")
            .env_remove("PARTD_SOCKET")
            .output()
            .unwrap()
    };
    let first = run(&["--json", "list"]);
    let err = String::from_utf8_lossy(&first.stderr).into_owned();
    // Whatever happens below, end the partd this test started.
    let pid: Option<u32> = err
        .split("started partd (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok());
    struct Reap(Option<u32>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(p) = self.0 {
                partvisor_e2e::kill(p, libc::SIGTERM);
                let _ = partvisor_e2e::wait_gone_quietly(p);
            }
        }
    }
    let _reap = Reap(pid);
    assert!(first.status.success(), "{err}");
    assert!(pid.is_some(), "no partd started: {err}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&first.stdout).unwrap(),
        serde_json::json!([])
    );
    let state = home.path().join(".local/state/partvisor");
    assert!(state.join("partd.sock").exists());
    assert!(state.join("resources.db").exists());
    // The second call finds it running and starts no other.
    let second = run(&["list"]);
    assert!(second.status.success());
    assert!(!String::from_utf8_lossy(&second.stderr).contains("started partd"));
}

#[test]
fn slow_clients_time_out_instead_of_holding_partd() {
    let partd = Partd::start(&["--request-timeout-ms", "300"]);
    let s = partd.socket.as_path();
    // A body that never arrives: 408 after the request timeout.
    let t0 = std::time::Instant::now();
    let (status, reply) = exchange(
        s,
        b"POST /v1/partitions HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n\r\n{\"name\"",
    )
    .expect("a reply to a stalled body");
    assert_eq!(status, 408, "{reply}");
    assert!(reply.contains("not received within 300 ms"), "{reply}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // A head that never ends: the connection is closed, no request is served.
    let t0 = std::time::Instant::now();
    let mut c = UnixStream::connect(s).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /v1/partitions HTTP/1.1\r\nHost: p\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "head timeout not enforced"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // partd still serves.
    assert_eq!(request(s, "GET", "/v1/partitions", "").0, 200);
}

#[test]
fn a_second_partd_on_the_same_state_dir_is_refused_and_the_first_keeps_serving() {
    let partd = Partd::start(&[]);
    let out = Command::new(&bins().partd)
        .arg("--state-dir")
        .arg(partd.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already open for writing by another process"),
        "{err}"
    );
    assert_eq!(partd.ctl_json(&["list"]), serde_json::json!([]));
}

/// xorshift64*: deterministic noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn random_requests_never_crash_or_hang_partd() {
    let partd = Partd::start(&["--request-timeout-ms", "500"]);
    let s = partd.socket.as_path();
    let mut n = Noise(0x9e37_79b9_7f4a_7c15);
    let methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "BREW"];
    let paths = [
        "/v1/partitions",
        "/v1/partitions/a",
        "/v1/partitions/a/start",
        "/v1/partitions/a/stop",
        "/v1/partitions/a/console",
        "/v1/partitions/%00",
        "/v1/partitions/a/b/c",
        "/v1/log?limit=-1",
        "/v1/log?partition=%ff",
        "/v1/resources",
        "//",
        "*",
    ];
    let bodies = [
        "",
        "{}",
        "null",
        "[]",
        "{\"force\": true, \"timeout_s\": 99999999999999999999}",
        "{\"name\": \"a\", \"memory_mib\": -1, \"kernel\": \"/\"}",
        "{\"name\": 7}",
        "\u{0}\u{1}\u{2}",
        "{\"a\":",
    ];
    for i in 0..300 {
        let raw = if n.next() % 5 == 0 {
            // Bytes that are not HTTP at all.
            (0..(n.next() % 200))
                .map(|_| n.next() as u8)
                .collect::<Vec<u8>>()
        } else {
            let body = n.pick(&bodies);
            format!(
                "{} {} HTTP/1.1\r\nHost: p\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                n.pick(&methods),
                n.pick(&paths),
                body.len()
            )
            .into_bytes()
        };
        let t0 = std::time::Instant::now();
        if let Some((status, reply)) = exchange(s, &raw) {
            assert!(
                (200..500).contains(&status) && status != 201 || status == 101,
                "request {i} got {status}: {reply}"
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "request {i} hung");
    }
    assert_eq!(request(s, "GET", "/v1/partitions", "").0, 200);
    assert!(partd.view().partitions().unwrap().is_empty());
}
