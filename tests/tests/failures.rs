//! Starts that cannot succeed: the partition ends `failed` with a reason an
//! operator can act on, and holds nothing.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use partvisor_e2e::Partd;
use resource_db::PartitionId;

#[test]
fn missing_monitor_binary_fails_the_start_and_releases_the_grant() {
    let partd = Partd::start(&["--vmm", "/nonexistent/part-vmm"]);
    partd.create("lost", "memory_mib = 16");
    let err = partd.ctl_err(&["start", "lost"]);
    assert!(
        err.contains("/nonexistent/part-vmm") && err.contains("--vmm"),
        "{err}"
    );
    let v = partd.ctl_json(&["show", "lost"]);
    assert_eq!(v["state"], "failed");
    assert_eq!(v["last_exit"]["reason"], "spawn-failed");
    let view = partd.view();
    assert!(view
        .holdings(&PartitionId::new("lost").unwrap())
        .unwrap()
        .is_at_rest());
    let free = view.free().unwrap();
    assert_eq!(free.memory_mib.free, free.memory_mib.total);
}

#[test]
fn kernel_the_monitor_cannot_load_fails_the_start_with_its_reason() {
    let partd = Partd::start(&[]);
    // A regular file that is neither an ELF nor a bzImage.
    let junk = partd.path().join("junk.bin");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let def = partd.path().join("junk.toml");
    std::fs::write(
        &def,
        format!(
            "name = \"junk\"\nmemory_mib = 16\nkernel = \"{}\"\n",
            junk.display()
        ),
    )
    .unwrap();
    partd.ctl_ok(&["create", def.to_str().unwrap()]);
    let err = partd.ctl_err(&["start", "junk"]);
    assert!(err.contains("ended while starting (failed)"), "{err}");
    assert!(err.contains("vmm.log"), "{err}");
    let v = partd.ctl_json(&["show", "junk"]);
    assert_eq!(v["state"], "failed");
    let status = v["last_exit"]["status"].as_i64().unwrap();
    assert!(status == 64 || status == 70, "{v}");
    assert!(partd.holdings("junk").is_at_rest());
}
