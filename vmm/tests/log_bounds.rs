//! What a guest can make its monitor log is bounded: each kind of line it
//! can cause at will is rate-limited with a count of what was suppressed,
//! and a process's log has a size cap (issue 12, item 6).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn a_guest_writing_a_logged_port_for_ten_seconds_grows_the_log_by_less_than_a_mebibyte() {
    let _l = vm_lock();
    let secs: u32 = std::env::var("PARTVISOR_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let r = run_guest(&format!("flood={secs}"), &[]);
    assert_eq!(
        r.code(),
        0,
        "serial:\n{}\nlog:\n{}",
        r.serial,
        &r.log[..r.log.len().min(4000)]
    );
    let writes: u64 = r
        .value("flood: ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let lines = r.log.matches("guest wrote sleep control").count();
    eprintln!(
        "{writes} sleep-control writes in {secs} s: {lines} log lines, {} log bytes",
        r.log.len()
    );
    assert!(writes > 10_000, "the guest barely wrote: {writes}");
    assert!(
        r.log.len() < 1 << 20,
        "the log grew by {} bytes",
        r.log.len()
    );
    assert!(
        r.log.contains("more like it suppressed"),
        "no suppressed count in the log:\n{}",
        &r.log[..r.log.len().min(4000)]
    );
}

#[test]
fn a_monitor_stops_writing_its_log_at_the_cap_and_says_so() {
    let _l = vm_lock();
    let g = guest();
    let mut cmd = command(&["--kernel", g.to_str().unwrap(), "--cmdline", "flood=1"]);
    cmd.env("PARTVISOR_LOG", "debug")
        .env("PARTVISOR_LOG_MAX_BYTES", "2000");
    let r = wait(cmd.spawn().unwrap(), "capped part-vmm");
    assert_eq!(r.code(), 0, "{}", r.serial);
    let notice =
        "log cap of 2000 bytes reached (PARTVISOR_LOG_MAX_BYTES); further lines are dropped\n";
    assert!(r.log.ends_with(notice), "{}", r.log);
    assert!(r.log.len() <= 2000 + notice.len(), "{} bytes", r.log.len());
}
