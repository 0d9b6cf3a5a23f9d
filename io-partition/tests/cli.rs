//! Command-line errors: one clear line, non-zero exit, never a panic.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_part-io"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn missing_image_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "socket={},image={}",
        dir.path().join("a.sock").display(),
        dir.path().join("missing.raw").display()
    );
    let (code, err) = run(&["blk", "--export", &spec]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot open image") && err.contains("missing.raw"),
        "{err}"
    );
    assert!(
        !dir.path().join("a.sock").exists(),
        "nothing bound on failure"
    );
}

#[test]
fn bad_socket_path_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let spec = format!(
        "socket={},image={}",
        dir.path().join("no/such/dir/a.sock").display(),
        image.display()
    );
    let (code, err) = run(&["blk", "--export", &spec]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot listen on socket") && err.contains("no/such/dir"),
        "{err}"
    );
    // A regular file where the socket should go is never replaced.
    let spec = format!("socket={},image={}", image.display(), image.display());
    let (code, err) = run(&["blk", "--export", &spec]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 4096);
}

#[test]
fn malformed_export_spec_is_a_usage_error() {
    let (code, err) = run(&["blk", "--export", "socket=/tmp/x.sock"]);
    assert_eq!(code, 2);
    assert!(err.contains("missing `image=PATH`"), "{err}");
    let (code, err) = run(&[
        "blk",
        "--export",
        "socket=/tmp/x.sock,image=/tmp/y,colour=red",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown key `colour`"), "{err}");
    let (code, _) = run(&["blk"]);
    assert_eq!(code, 2);
}

#[test]
fn one_image_in_two_writable_exports_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let spec = |s: &str| {
        format!(
            "socket={},image={}",
            dir.path().join(s).display(),
            image.display()
        )
    };
    let (code, err) = run(&[
        "blk",
        "--export",
        &spec("a.sock"),
        "--export",
        &spec("b.sock"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("is in use"), "{err}");
}

#[test]
fn bad_net_ports_are_usage_or_one_line_errors() {
    let (code, err) = run(&["net", "--port", "socket=/tmp/x.sock,mac=02:00:00:00:00"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not a MAC address"), "{err}");
    let (code, err) = run(&["net", "--port", "socket=/tmp/x.sock,mac=ff:ff:ff:ff:ff:ff"]);
    assert_eq!(code, 2);
    assert!(err.contains("needs a unicast MAC"), "{err}");
    let (code, _) = run(&["net"]);
    assert_eq!(code, 2, "at least one port");

    let dir = tempfile::tempdir().unwrap();
    let port = |s: &str, m: &str| format!("socket={},mac={m}", dir.path().join(s).display());
    let (code, err) = run(&[
        "net",
        "--port",
        &port("a.sock", "02:00:00:00:00:01"),
        "--port",
        &port("b.sock", "02:00:00:00:00:01"),
    ]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("MAC 02:00:00:00:00:01 is given to two ports"),
        "{err}"
    );
    assert!(
        !dir.path().join("a.sock").exists(),
        "nothing bound on failure"
    );

    let (code, err) = run(&[
        "net",
        "--port",
        &port("no/such/dir/a.sock", "02:00:00:00:00:01"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot listen on socket"), "{err}");

    let (code, err) = run(&[
        "net",
        "--port",
        &port("a.sock", "02:00:00:00:00:01"),
        "--tap",
        "name/with/slash",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("tap interface name"), "{err}");
}
