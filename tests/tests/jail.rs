//! Every process partd starts for a partition is confined (issue 12):
//! read back from `/proc`, not taken on trust.

// Test code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use partvisor_e2e::{console_of, vm_lock, wait_console, Partd};

const BOOT: Duration = Duration::from_secs(60);

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

/// Every thread of `pid` with its name and number of seccomp filters; each
/// must be filtered (`Seccomp: 2`).
fn filtered_threads(pid: u32, what: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // ended meanwhile
        };
        let name = field(&status, "Name");
        assert_eq!(field(&status, "Seccomp"), "2", "{what} thread {name}");
        out.push((name, field(&status, "Seccomp_filters").parse().unwrap()));
    }
    out
}

/// Checks process `pid` runs as `uid` (all four), with no capability, no
/// way to gain one, none of this test's (= partd's) namespaces, and every
/// thread under a seccomp filter.
fn assert_confined(pid: u32, uid: u32, what: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let u = uid.to_string();
    assert_eq!(
        field(&status, "Uid"),
        [&*u, &u, &u, &u].join("\t"),
        "{what}"
    );
    assert_eq!(
        field(&status, "Gid"),
        [&*u, &u, &u, &u].join("\t"),
        "{what}"
    );
    assert_eq!(field(&status, "Groups"), "", "{what}");
    for cap in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&status, cap), "0000000000000000", "{what} {cap}");
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{what}");
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{what} shares the {ns} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{what}: {core}");
    let threads = filtered_threads(pid, what);
    assert!(!threads.is_empty(), "{what}");
}

#[test]
fn every_monitor_and_io_partition_runs_as_its_own_uid_without_capabilities_in_namespaces_of_its_own(
) {
    let _vm = vm_lock();
    let img_dir = tempfile::tempdir().unwrap();
    let img = img_dir.path().join("web.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // Readable and writable by root only: partd opens it, the jailed disk
    // backend (another uid) gets the descriptor.
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let img_s = img.display().to_string();
    let partd = Partd::start(&["--disk-image", &img_s]);
    let def = partd.definition_with(
        "web",
        "blk=write:7:64 blk=verify:7:64 stay",
        &format!("[[disk]]\nimage = \"{img_s}\"\n[[nic]]\nswitch = \"lan\"\n[vsock]\n"),
    );
    partd.ctl_ok(&["create", def.to_str().unwrap()]);
    let v = partd.ctl_json(&["start", "web"]);
    let text = wait_console(&console_of(&v), "stay: idle", BOOT);
    assert!(text.contains("blk: verified 64 blocks ok"), "{text}");
    let uids = partd.holdings("web").uids;
    assert_eq!(uids.len(), 2);
    let io_uid = resource_db::HostConfig::empty().io_uid;

    let vmm = v["vmm"]["pid"].as_u64().unwrap() as u32;
    assert_confined(vmm, uids[0], "part-vmm");
    // In a cgroup of its own (placed beside the start: waited for).
    let own = format!("partvisor/web.{vmm}");
    let mut cgroups = String::new();
    for _ in 0..50 {
        cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
        if cgroups.contains(&own) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cgroups.contains(&own), "{cgroups}");
    // Roles: the event loop's filter on the main thread, and a vCPU's own
    // on top of it on each vCPU thread (threads KVM starts in the process,
    // such as kvm-nx-lpage-recovery, inherit their creator's).
    let threads = filtered_threads(vmm, "part-vmm");
    let count = |prefix: &str, filters: u32| {
        threads
            .iter()
            .filter(|(n, f)| n.starts_with(prefix) && *f == filters)
            .count()
    };
    assert_eq!(count("part-vmm", 1), 1, "{threads:?}");
    assert_eq!(count("vcpu", 2), 1, "one vCPU, two filters: {threads:?}");
    assert_eq!(count("vcpu", 1), 0, "{threads:?}");
    let io = v["io"].as_array().unwrap();
    let mut kinds = Vec::new();
    for p in io {
        let kind = p["kind"].as_str().unwrap();
        let want = if kind == "blk" { uids[1] } else { io_uid };
        let pid = p["pid"].as_u64().unwrap() as u32;
        assert_confined(pid, want, kind);
        if kind == "blk" {
            // The queue worker that served the guest's requests entered
            // its own role on top of the process's.
            let threads = filtered_threads(pid, kind);
            assert!(threads.iter().any(|(_, f)| *f == 2), "{threads:?}");
            assert!(threads.iter().all(|(_, f)| *f >= 1), "{threads:?}");
        }
        kinds.push(kind.to_string());
    }
    kinds.sort();
    assert_eq!(kinds, ["blk", "net", "vsock"]);

    // The disk socket is the monitor's alone: another uid cannot connect.
    let disk = partd.path().join("partitions/web/disks/disk0.sock");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uids[0]);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let other = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1])\n print('connected')\nexcept PermissionError:\n print('refused')",
            disk.to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&other.stdout).trim(), "refused");
    partd.ctl_ok(&["stop", "web"]);
}

use std::os::unix::process::CommandExt;
