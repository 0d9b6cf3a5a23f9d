//! resources/systemd/partd.service and partd's sd_notify protocol.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use partvisor_e2e::{bins, kill};

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/systemd/partd.service")
}

/// Runs `systemd-analyze verify` on `text` saved as partd.service with
/// ExecStart pointing at the built partd; returns its combined output, or
/// `None` when the tool is missing.
fn verify(text: &str) -> Option<(bool, String)> {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("partd.service");
    let text = text.replace("/usr/local/bin/partd", &bins().partd.display().to_string());
    std::fs::write(&unit, text).unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let mut all = String::from_utf8_lossy(&out.stdout).into_owned();
    all.push_str(&String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), all))
}

#[test]
fn unit_passes_systemd_analyze_verify_without_warnings() {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    for must in [
        "Type=notify",
        "KillMode=process",
        "DeviceAllow=/dev/kvm rw",
        "ExecStart=/usr/local/bin/partd --state-dir /var/lib/partvisor",
    ] {
        assert!(text.lines().any(|l| l.trim() == must), "unit lacks {must}");
    }
    let Some((ok, output)) = verify(&text) else {
        partvisor_runtime::ci::environment_missing(
            "systemd-analyze not found (install the systemd package to run this check)",
        );
        return;
    };
    assert!(
        ok && output.trim().is_empty(),
        "systemd-analyze verify: {output}"
    );
    // The same check notices a mistake (so the pass above means something).
    let (_, bad) = verify(&text.replace("KillMode=process", "KillMod=process")).unwrap();
    assert!(bad.contains("Unknown key 'KillMod'"), "{bad}");
}

#[test]
fn partd_notifies_ready_then_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let state = dir.path().join("state");
    let mut child = Command::new(&bins().partd)
        .arg("--state-dir")
        .arg(&state)
        .args(["--memory-budget-mib", "64"])
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY notification");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    // READY comes after the API socket is listening.
    assert!(std::os::unix::net::UnixStream::connect(state.join("partd.sock")).is_ok());
    kill(child.id(), libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("STOPPING notification");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
    let st = child.wait().unwrap();
    assert!(st.success(), "partd exit after SIGTERM: {st}");
    assert!(!state.join("partd.sock").exists(), "API socket left behind");
}
