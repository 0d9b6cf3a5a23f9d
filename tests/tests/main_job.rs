//! The README's main job (`resources/examples/main-job.sh`) runs as written
//! and passes every check it makes (issue 7, item 4).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use partvisor_e2e::{bins, guest, vm_lock};

#[test]
fn main_job_boots_two_guests_that_use_their_disks_exchange_frames_and_talk_over_vsock_then_cleans_up(
) {
    let _vm = vm_lock();
    // The binaries are built (and the target dir found) as for every e2e test.
    let target_dir = bins()
        .partd
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/partd")
        .to_path_buf();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/examples/main-job.sh");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t0 = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .env("CARGO", cargo)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("PARTVISOR_GUEST", guest())
        .output()
        .expect("run main-job.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "main-job.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("main job: every check passed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // Progress lines for every phase, building first.
    for phase in ["1/7 building", "4/7 booting", "7/7 what happened"] {
        assert!(stdout.contains(phase), "no {phase:?} in:\n{stdout}");
    }
    // The vsock step's figures.
    let figures = stdout
        .lines()
        .find(|l| l.contains("vsock: 64 MiB each way at once in"))
        .unwrap_or_else(|| panic!("no vsock figures in:\n{stdout}"));
    assert!(
        figures.contains("MB/s in all") && figures.contains("p99="),
        "{figures}"
    );
    eprintln!("{}", figures.trim());
    // Its state dir was under $HOME and is gone, with every process it made.
    let state: PathBuf = stdout
        .lines()
        .find_map(|l| l.split(" serving ").nth(1))
        .and_then(|s| Path::new(s.trim()).parent().map(Path::to_path_buf))
        .unwrap_or_else(|| panic!("no partd line in:\n{stdout}"));
    let home = std::env::var_os("HOME").expect("HOME");
    assert!(state.starts_with(&home), "{}", state.display());
    assert!(!state.exists(), "{} left behind", state.display());
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(state.to_str().unwrap()))
        .collect();
    assert!(leftovers.is_empty(), "still running: {leftovers:?}");
    eprintln!("main-job.sh took {:?}", t0.elapsed());
}
