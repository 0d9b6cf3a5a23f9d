//! partd + partctl + part-vmm + the test guest, end to end (issue 5).
//! Guest-booting tests take `vm_lock()` so only one runs at a time.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use partvisor_e2e::{alive, console_of, kill, vm_lock, wait_console, wait_gone, Partd};
use resource_db::{Change, LogRecord, Owner, PartitionId, PartitionState, ResourceId};

const BOOT: Duration = Duration::from_secs(60);

fn pid_of(v: &serde_json::Value) -> u32 {
    v["vmm"]["pid"]
        .as_u64()
        .expect("a running partition has a monitor pid") as u32
}

#[test]
fn start_boots_the_guest_and_stop_returns_every_resource_to_available() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    let def = partd.definition("web", "vcpus = 2\nmemory_mib = 64\ncpu_share = 0.5");
    let view = partd.view();
    let free_before = view.free().unwrap();

    let created = partd.ctl_json(&["create", def.to_str().unwrap()]);
    assert_eq!(created["state"], "defined");

    let started = partd.ctl_json(&["start", "web"]);
    assert_eq!(started["state"], "running");
    let pid = pid_of(&started);
    assert!(alive(pid));
    let console = wait_console(&console_of(&started), "stay: idle", BOOT);
    // The monitor runs from a sealed memfd descriptor of exactly the grant.
    let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
    assert!(
        fd3.to_string_lossy()
            .starts_with("/memfd:partvisor-descriptor-web"),
        "{fd3:?}"
    );
    let desc = std::fs::File::open(format!("/proc/{pid}/fd/3")).unwrap();
    // SAFETY: F_GET_SEALS on an open descriptor owned by this scope.
    let seals = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&desc), libc::F_GET_SEALS) };
    assert_eq!(
        seals & (libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL),
        libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL
    );
    let cfg =
        part_vmm::config::VmConfig::from_json(&std::io::read_to_string(desc).unwrap()).unwrap();
    assert_eq!(
        (cfg.vcpus, cfg.memory_mib, cfg.cmdline.as_str()),
        (2, 64, "stay")
    );
    let pool: Vec<usize> = partd
        .view()
        .host()
        .shared_pool_cpus
        .iter()
        .map(|c| *c as usize)
        .collect();
    assert_eq!(
        cfg.cpu_affinity,
        Some(pool),
        "shared partitions run on the pool's CPUs"
    );
    assert!(console.contains("cpus: 2 (madt)"), "{console}");
    assert!(console.contains("cmdline: stay"), "{console}");

    // list and show (JSON) report it running with what it holds.
    let list = partd.ctl_json(&["list"]);
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["name"], "web");
    assert_eq!(rows[0]["state"], "running");
    assert_eq!(rows[0]["holdings"]["cpu_share_milli"], 500);
    let show = partd.ctl_json(&["show", "web"]);
    assert_eq!(show["holdings"]["memory"][0]["len_mib"], 64);
    assert_eq!(show["vmm"]["pid"], pid);
    // The table forms name the same facts.
    let table = partd.ctl_ok(&["list"]);
    assert!(
        table.contains("web") && table.contains("running") && table.contains("shared 0.500"),
        "{table}"
    );

    // The resource database agrees, read through its own read API.
    let web = PartitionId::new("web").unwrap();
    let held = view.holdings(&web).unwrap();
    assert_eq!((held.memory_mib(), held.cpu_share_milli), (64, 500));
    let extent = held.memory[0];
    assert_eq!(
        view.owner(&ResourceId::Memory(extent)).unwrap(),
        Owner::partition(&web)
    );
    assert_eq!(
        view.partition(&web).unwrap().unwrap().state,
        PartitionState::Running
    );

    // Everything was granted in ONE transaction, together with `starting`.
    let log = view.log(resource_db::TxId(1), 1000).unwrap();
    let grants: Vec<&Vec<Change>> = log
        .iter()
        .filter_map(|e| match &e.record {
            LogRecord::Transaction { changes } => Some(changes),
            _ => None,
        })
        .filter(|c| {
            c.iter().any(|x| {
                matches!(
                    x,
                    Change::SetState {
                        after: PartitionState::Starting,
                        ..
                    }
                )
            })
        })
        .collect();
    assert_eq!(grants.len(), 1);
    assert!(grants[0].iter().any(|c| matches!(
        c,
        Change::Transfer {
            resource: ResourceId::Memory(_),
            ..
        }
    )));
    assert!(grants[0].iter().any(|c| matches!(
        c,
        Change::Share {
            after_milli: 500,
            ..
        }
    )));

    // A second start is refused; a destroy of a running partition too.
    let again = partd.ctl(&["start", "web"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));
    let destroy = partd.ctl(&["destroy", "web"]);
    assert!(!destroy.status.success());
    assert!(String::from_utf8_lossy(&destroy.stderr).contains("stop web"));

    let stopped = partd.ctl_json(&["stop", "web"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["last_exit"]["reason"], "power-off");
    assert!(!alive(pid));
    assert!(view.holdings(&web).unwrap().is_at_rest());
    // Its monitor's and disk backend's uids stay with it until destroy.
    let uids = view.holdings(&web).unwrap().uids;
    assert_eq!(uids.len(), 2, "{uids:?}");
    assert!(uids
        .iter()
        .all(|u| *u >= resource_db::HostConfig::empty().first_uid));
    assert_eq!(
        view.owner(&ResourceId::Memory(extent)).unwrap(),
        Owner::Available
    );
    let mut free_after = view.free().unwrap();
    assert_eq!(free_after.uids.free + 2, free_before.uids.free);
    free_after.uids = free_before.uids;
    assert_eq!(free_after, free_before);
    view.check_invariants().unwrap();
    view.check_replay().unwrap();

    // The audit log records every transition, in order.
    let states: Vec<(PartitionState, PartitionState)> = view
        .log(resource_db::TxId(1), 1000)
        .unwrap()
        .iter()
        .filter_map(|e| match &e.record {
            LogRecord::Transaction { changes } => Some(changes.clone()),
            _ => None,
        })
        .flatten()
        .filter_map(|c| match c {
            Change::SetState { before, after, .. } => Some((before, after)),
            _ => None,
        })
        .collect();
    use PartitionState::*;
    assert_eq!(
        states,
        vec![
            (Defined, Starting),
            (Starting, Running),
            (Running, Stopping),
            (Stopping, Stopped)
        ]
    );

    // partctl log shows the same audit entries, filtered to the partition.
    let entries = partd.ctl_json(&["log", "web"]);
    let entries = entries.as_array().unwrap();
    assert_eq!(
        entries.len(),
        5,
        "create, grant, running, stopping, release"
    );
    assert!(entries.iter().all(|e| e["actor"] == "partd"));
    let last = view.last_txid().unwrap().0;
    let tail = partd.ctl_json(&["log", "--limit", "2"]);
    let txids: Vec<u64> = tail
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["txid"].as_u64().unwrap())
        .collect();
    assert_eq!(txids, vec![last - 1, last]);
    let table = partd.ctl_ok(&["log", "web"]);
    assert!(table.contains("web: starting -> running"), "{table}");

    partd.ctl_ok(&["destroy", "web"]);
    assert_eq!(partd.ctl_json(&["list"]), serde_json::json!([]));
    let gone = partd.ctl(&["show", "web"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no partition named web"));
}

#[test]
fn more_partitions_than_capacity_are_refused_and_allocate_nothing() {
    let _vm = vm_lock();
    // 160 MiB budget: one 96 MiB partition fits, a second does not.
    let partd = Partd::start(&["--memory-budget-mib", "160"]);
    let a = partd.definition("a", "memory_mib = 96\ncpus = [1]");
    let b = partd.definition("b", "memory_mib = 96");
    let c = partd.definition("c", "memory_mib = 16\ncpus = [1]");
    let d = partd.definition("d", "memory_mib = 16\nvcpus = 2\ncpu_share = 1.5");
    for f in [&a, &b, &c, &d] {
        partd.ctl_ok(&["create", f.to_str().unwrap()]);
    }
    let started = partd.ctl_json(&["start", "a"]);
    assert_eq!(started["state"], "running");
    let view = partd.view();
    let free_after_a = view.free().unwrap();
    let log_len = view.last_txid().unwrap();

    for (name, want) in [
        ("b", "not enough memory MiB: 96 requested, 64 free"),
        ("c", "cpu 1 is held by a"),
        ("d", "not enough shared pool milli-CPUs"),
    ] {
        let out = partd.ctl(&["start", name]);
        assert!(!out.status.success(), "{name} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && err.contains("nothing was allocated"),
            "{name}: {err}"
        );
        let id = PartitionId::new(name).unwrap();
        assert!(view.holdings(&id).unwrap().is_at_rest());
        assert_eq!(
            view.partition(&id).unwrap().unwrap().state,
            PartitionState::Defined
        );
    }
    assert_eq!(view.free().unwrap(), free_after_a);
    assert_eq!(
        view.last_txid().unwrap(),
        log_len,
        "a refused start committed something"
    );

    let stopped = partd.ctl_json(&["stop", "a", "--force"]);
    assert_eq!(stopped["state"], "stopped");
    // Now b fits.
    assert_eq!(partd.ctl_json(&["start", "b"])["state"], "running");
    partd.ctl_json(&["stop", "b", "--force"]);
    view.check_invariants().unwrap();
}

#[test]
fn vcpu_threads_of_a_partition_with_dedicated_cpus_have_that_affinity() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    partd.create("pinned", "vcpus = 2\nmemory_mib = 32\ncpus = [1]");
    let v = partd.ctl_json(&["start", "pinned"]);
    let pid = pid_of(&v);
    wait_console(&console_of(&v), "stay: idle", BOOT);
    let mut vcpus = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        if comm.trim().starts_with("vcpu") {
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            vcpus.push((comm.trim().to_string(), allowed));
        }
    }
    vcpus.sort();
    assert_eq!(
        vcpus,
        vec![
            ("vcpu0".to_string(), "1".to_string()),
            ("vcpu1".to_string(), "1".to_string())
        ]
    );
    let held = partd.holdings("pinned");
    assert_eq!(held.cpus, vec![1]);
    partd.ctl_json(&["stop", "pinned"]);
}

#[test]
fn partd_restart_reattaches_running_guests_and_fails_one_killed_meanwhile() {
    let _vm = vm_lock();
    let mut partd = Partd::start(&[]);
    let mut pids = Vec::new();
    for name in ["one", "two", "three"] {
        partd.create(name, "memory_mib = 32");
        let v = partd.ctl_json(&["start", name]);
        wait_console(&console_of(&v), "stay: idle", BOOT);
        pids.push(pid_of(&v));
    }
    let old_partd = partd.pid();
    partd.kill9();
    assert!(!alive(old_partd));
    // The guests keep running without partd; one monitor dies meanwhile.
    assert!(pids.iter().all(|p| alive(*p)));
    kill(pids[2], libc::SIGKILL);
    wait_gone(pids[2], Duration::from_secs(10));

    partd.restart();
    for (name, pid) in [("one", pids[0]), ("two", pids[1])] {
        let v = partd.ctl_json(&["show", name]);
        assert_eq!(v["state"], "running", "{name}: {v}");
        assert_eq!(pid_of(&v), pid, "{name} re-attached to another pid");
    }
    let three = partd.ctl_json(&["show", "three"]);
    assert_eq!(three["state"], "failed");
    assert_eq!(three["last_exit"]["reason"], "no-exit-record");
    assert!(three["last_exit"]["detail"]
        .as_str()
        .unwrap()
        .contains("while partd was not watching"));
    let view = partd.view();
    assert!(view
        .holdings(&PartitionId::new("three").unwrap())
        .unwrap()
        .is_at_rest());
    assert_eq!(
        view.holdings(&PartitionId::new("one").unwrap())
            .unwrap()
            .memory_mib(),
        32
    );
    assert!(partd
        .log()
        .contains("re-attached 2 monitor(s), 1 ended while partd was down"));

    // Still supervised: stop works on both and their ends are recorded.
    for (name, pid) in [("one", pids[0]), ("two", pids[1])] {
        let v = partd.ctl_json(&["stop", name]);
        assert_eq!(v["state"], "stopped", "{name}: {v}");
        assert_eq!(v["last_exit"]["reason"], "power-off");
        wait_gone(pid, Duration::from_secs(5));
    }
    let free = view.free().unwrap();
    assert_eq!(free.memory_mib.free, free.memory_mib.total);
    assert_eq!(free.shared_pool_milli.free, free.shared_pool_milli.total);
    view.check_invariants().unwrap();
    // A failed partition can be started again.
    let again = partd.ctl_json(&["start", "three"]);
    assert_eq!(again["state"], "running");
    partd.ctl_json(&["stop", "three", "--force"]);
}

#[test]
fn sigstopped_monitor_becomes_unresponsive_and_stop_force_ends_it() {
    let _vm = vm_lock();
    let partd = Partd::start(&["--ping-timeout-ms", "200", "--unresponsive-after-ms", "600"]);
    partd.create("hung", "memory_mib = 32");
    let v = partd.ctl_json(&["start", "hung"]);
    let pid = pid_of(&v);
    wait_console(&console_of(&v), "stay: idle", BOOT);
    kill(pid, libc::SIGSTOP);
    let t0 = std::time::Instant::now();
    partd.wait_state("hung", "unresponsive", Duration::from_secs(10));
    eprintln!("unresponsive after {:?}", t0.elapsed());
    // It recovers when the monitor answers again...
    kill(pid, libc::SIGCONT);
    partd.wait_state("hung", "running", Duration::from_secs(10));
    // ...and a monitor that hangs again is found again.
    kill(pid, libc::SIGSTOP);
    partd.wait_state("hung", "unresponsive", Duration::from_secs(10));
    let v = partd.ctl_json(&["stop", "hung", "--force"]);
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["last_exit"]["reason"], "killed-by-partd");
    wait_gone(pid, Duration::from_secs(5));
    assert!(partd.holdings("hung").is_at_rest());
}

#[test]
fn console_shows_the_guest_until_it_stops() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    partd.create("talk", "memory_mib = 32");
    let v = partd.ctl_json(&["start", "talk"]);
    wait_console(&console_of(&v), "stay: idle", BOOT);
    let console = std::process::Command::new(&partvisor_e2e::bins().partctl)
        .arg("--socket")
        .arg(&partd.socket)
        .args(["console", "talk"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let it attach and receive the backlog, then stop the guest.
    std::thread::sleep(Duration::from_millis(300));
    partd.ctl_json(&["stop", "talk"]);
    let out = console.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("partvisor-testguest 1"), "{text}");
    assert!(text.contains("stay: idle"), "{text}");
    assert!(text.contains("stop: power button"), "{text}");
    // A stopped partition has no console.
    let none = partd.ctl(&["console", "talk"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no console"));
}

#[test]
fn stop_timeout_forces_a_guest_that_ignores_the_power_button() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    // `echo=N` waits for serial input and does not listen to the power button.
    let def = partd.path().join("deaf.toml");
    std::fs::write(
        &def,
        format!(
            "name = \"deaf\"\nmemory_mib = 32\nkernel = \"{}\"\ncmdline = \"echo=4\"\nstop_timeout_s = 60\n",
            partvisor_e2e::guest().display()
        ),
    )
    .unwrap();
    partd.ctl_ok(&["create", def.to_str().unwrap()]);
    let v = partd.ctl_json(&["start", "deaf"]);
    wait_console(&console_of(&v), "echo: ready", BOOT);
    let t0 = std::time::Instant::now();
    let v = partd.ctl_json(&["stop", "deaf", "--timeout", "1"]);
    let took = t0.elapsed();
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["last_exit"]["reason"], "forced-stop");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "forced after {took:?}"
    );
    assert!(partd.holdings("deaf").is_at_rest());
}

#[test]
fn guest_crash_marks_the_partition_failed_with_its_reason_and_releases_it() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    let def = partd.path().join("crash.toml");
    std::fs::write(
        &def,
        format!(
            "name = \"crash\"\nmemory_mib = 32\nkernel = \"{}\"\ncmdline = \"crash=triple\"\n",
            partvisor_e2e::guest().display()
        ),
    )
    .unwrap();
    partd.ctl_ok(&["create", def.to_str().unwrap()]);
    // The guest may die before or after its monitor first answers: start
    // reports either `running` or that it ended while starting.
    let out = partd.ctl(&["start", "crash"]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("ended while starting") && err.contains("triple-fault"),
            "{err}"
        );
    }
    let v = partd.wait_state("crash", "failed", Duration::from_secs(30));
    assert_eq!(v["last_exit"]["reason"], "triple-fault");
    assert_eq!(v["last_exit"]["status"], 72);
    let view = partd.view();
    assert!(view
        .holdings(&PartitionId::new("crash").unwrap())
        .unwrap()
        .is_at_rest());
    view.check_invariants().unwrap();
}

#[test]
fn partd_killed_during_a_stop_finishes_it_after_restart() {
    let _vm = vm_lock();
    let mut partd = Partd::start(&[]);
    // `echo=N` ignores the power button; part-vmm forces the stop after 2 s.
    let def = partd.path().join("slow.toml");
    std::fs::write(
        &def,
        format!(
            "name = \"slow\"\nmemory_mib = 32\nkernel = \"{}\"\ncmdline = \"echo=4\"\nstop_timeout_s = 2\n",
            partvisor_e2e::guest().display()
        ),
    )
    .unwrap();
    partd.ctl_ok(&["create", def.to_str().unwrap()]);
    let v = partd.ctl_json(&["start", "slow"]);
    let pid = pid_of(&v);
    wait_console(&console_of(&v), "echo: ready", BOOT);
    let stopper = std::process::Command::new(&partvisor_e2e::bins().partctl)
        .arg("--socket")
        .arg(&partd.socket)
        .args(["stop", "slow"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    partd.wait_state("slow", "stopping", Duration::from_secs(10));
    partd.kill9();
    let _ = stopper.wait_with_output();
    assert!(alive(pid), "the monitor died with partd");
    partd.restart();
    let v = partd.wait_state("slow", "stopped", Duration::from_secs(20));
    assert_eq!(v["last_exit"]["reason"], "forced-stop");
    wait_gone(pid, Duration::from_secs(5));
    assert!(partd.holdings("slow").is_at_rest());
}

#[test]
fn every_monitor_has_a_cgroup_of_its_own_weighted_by_its_share() {
    let _vm = vm_lock();
    let partd = Partd::start(&[]);
    partd.create("weighted", "memory_mib = 32\ncpu_share = 0.5");
    let v = partd.ctl_json(&["start", "weighted"]);
    let pid = pid_of(&v);
    if partd
        .log()
        .contains("shares of the shared CPU pool are not weighted")
    {
        partvisor_runtime::ci::environment_missing(
            "no writable cpu cgroup controller here (partd logged why)",
        );
        partd.ctl_json(&["stop", "weighted", "--force"]);
        return;
    }
    assert!(partd.log().contains("shared-pool shares weighted in"));
    // The move into the cgroup runs beside the start: wait for it.
    let t0 = std::time::Instant::now();
    let cgroup = loop {
        let v = partd.ctl_json(&["show", "weighted"]);
        if let Some(c) = v["vmm"]["cgroup"].as_str() {
            let c = std::path::PathBuf::from(c);
            let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
            if procs.lines().any(|l| l.trim() == pid.to_string()) {
                break c;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "monitor never placed: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == pid.to_string()),
        "pid {pid} not in {}: {procs}",
        cgroup.display()
    );
    // v1: cpu.shares = 500 * 1024 / 1000; v2: cpu.weight = 500 / 10.
    if let Ok(shares) = std::fs::read_to_string(cgroup.join("cpu.shares")) {
        assert_eq!(shares.trim(), "512");
    } else {
        let weight = std::fs::read_to_string(cgroup.join("cpu.weight")).unwrap();
        assert_eq!(weight.trim(), "50");
    }
    // A dedicated-CPU partition is confined by affinity, and still has a
    // cgroup of its own (one whole CPU's weight), so every monitor can be
    // accounted and killed as a group.
    let pinned = partd.definition("pinned", "memory_mib = 32\ncpus = [1]");
    partd.ctl_ok(&["create", pinned.to_str().unwrap()]);
    let p = partd.ctl_json(&["start", "pinned"]);
    let pinned_cgroup = std::path::PathBuf::from(p["vmm"]["cgroup"].as_str().unwrap());
    let pinned_pid = p["vmm"]["pid"].as_u64().unwrap();
    assert!(
        pinned_cgroup.ends_with(format!("partvisor/pinned.{pinned_pid}")),
        "{p}"
    );
    if let Ok(shares) = std::fs::read_to_string(pinned_cgroup.join("cpu.shares")) {
        assert_eq!(shares.trim(), "1024");
    } else {
        let weight = std::fs::read_to_string(pinned_cgroup.join("cpu.weight")).unwrap();
        assert_eq!(weight.trim(), "100");
    }
    partd.ctl_json(&["stop", "pinned", "--force"]);
    partd.ctl_json(&["stop", "weighted", "--force"]);
    for c in [&cgroup, &pinned_cgroup] {
        assert!(!c.exists(), "{} left behind", c.display());
    }
}
