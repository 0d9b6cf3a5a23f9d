//! resources/systemd/partd.service and partd's sd_notify protocol.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use partvisor_e2e::{bins, is_comm, kill};

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

/// systemd as PID 1 of private pid, mount and cgroup namespaces
/// (`tests/systemd/container.sh`, which says what keeps it off the host).
/// Dropping it kills everything inside and removes its cgroups.
struct Container {
    child: std::process::Child,
    /// systemd's pid as the host sees it.
    init: u32,
    dir: PathBuf,
}

impl Container {
    /// Boots systemd with the units in `dir/units` and waits until it runs.
    fn boot(dir: &Path, id: &str) -> Container {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/container.sh");
        let log = std::fs::File::create(dir.join("systemd.log")).unwrap();
        let mut cmd = Command::new(script);
        // SAFETY: prctl is async-signal-safe and touches only this child.
        // It survives the exec into unshare, so a test killed mid-way takes
        // the container (unshare --kill-child) with it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg(id)
            .arg(dir.join("units"))
            .arg("pv-test.target")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Container {
            init: 0,
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut state = String::new();
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = c.child.try_wait() {
                panic!("container.sh exited ({st}): {}", c.log());
            }
            // Until container.sh has become unshare, its children are the
            // tools it runs: only a child named systemd is the init.
            if c.init == 0 || !is_comm(c.init, "systemd") {
                let children = format!("/proc/{0}/task/{0}/children", c.child.id());
                c.init = std::fs::read_to_string(children)
                    .unwrap_or_default()
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
            }
            if c.init != 0 && is_comm(c.init, "systemd") {
                let out = c.systemctl(&["is-system-running"]);
                state = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                if state == "running" || state == "degraded" {
                    return c;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "systemd did not come up (init {}, comm {:?}, state {state:?}): {}",
            c.init,
            std::fs::read_to_string(format!("/proc/{}/comm", c.init)).unwrap_or_default(),
            c.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("systemd.log")).unwrap_or_default()
    }

    /// Runs `cmd` inside the container's mount and pid namespaces.
    fn exec(&self, cmd: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.init.to_string())
            .args(["-m", "-p", "--"])
            .args(cmd)
            .output()
            .unwrap()
    }

    fn systemctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = vec!["systemctl", "--no-pager"];
        cmd.extend_from_slice(args);
        self.exec(&cmd)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // container.sh is unshare with --kill-child: its death takes systemd,
        // and with it the whole pid namespace.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.init != 0 {
            partvisor_e2e::wait_gone_quietly(self.init);
        }
        let list = std::fs::read_to_string(self.dir.join("cgroups")).unwrap_or_default();
        for top in list.lines() {
            let mut dirs: Vec<PathBuf> = Vec::new();
            let mut stack = vec![PathBuf::from(top)];
            while let Some(d) = stack.pop() {
                if let Ok(rd) = std::fs::read_dir(&d) {
                    stack.extend(
                        rd.flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                }
                dirs.push(d);
            }
            // Deepest first; a cgroup goes only once its processes have.
            for d in dirs.iter().rev() {
                for _ in 0..50 {
                    if std::fs::remove_dir(d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

fn proc_field(c: &Container, pid: &str, field: &str) -> String {
    let out = c.exec(&["cat", &format!("/proc/{pid}/status")]);
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} for pid {pid}: {status}"))
}

/// The shipped unit, verbatim, run by a real systemd: only the paths (the
/// binaries, the state and image directories, the log) come from a drop-in.
/// partd jails its children inside the unit's sandbox and boots a
/// partition with a writable disk and a NIC; killed, it is restarted by
/// systemd and takes its partitions back.
#[test]
fn partd_under_the_shipped_unit_in_systemd_boots_a_partition_with_a_disk_and_a_nic() {
    let _vm = partvisor_e2e::vm_lock();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        partvisor_runtime::ci::environment_missing("root, to run systemd in namespaces");
        return;
    }
    if Command::new("nsenter").arg("--version").output().is_err() {
        partvisor_runtime::ci::environment_missing("nsenter (util-linux)");
        return;
    }
    // Everything partd is given lives where the unit lets it see: not under
    // /tmp or /var/tmp (the unit gives partd private ones), whatever
    // directory this checkout is in.
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if target_tmp.starts_with("/tmp") || target_tmp.starts_with("/var/tmp") {
        let b = PathBuf::from("/var/lib/partvisor-e2e");
        std::fs::create_dir_all(&b).unwrap();
        b
    } else {
        target_tmp.to_path_buf()
    };
    let scratch = tempfile::Builder::new()
        .prefix("pv-systemd-")
        .tempdir_in(&base)
        .unwrap();
    let dir = scratch.path();
    let (state, images, units) = (dir.join("state"), dir.join("images"), dir.join("units"));
    for d in [
        &state,
        &images,
        &units.join("partd.service.d"),
        &dir.join("bin"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The programs and the guest, copied in beside them.
    let copy_in = |from: &Path| -> PathBuf {
        let to = dir.join("bin").join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap();
        to
    };
    let built = bins();
    let (partd_bin, vmm_bin, io_bin, guest) = (
        copy_in(&built.partd),
        copy_in(&built.part_vmm),
        copy_in(&built.part_io),
        copy_in(partvisor_e2e::guest()),
    );
    // Their directories must be searchable by the jailed uids.
    for d in [dir, &dir.join("bin")] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let img = images.join("web.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::copy(unit_path(), units.join("partd.service")).unwrap();
    std::fs::write(
        units.join("pv-test.target"),
        "[Unit]\nDescription=partvisor systemd test\nDefaultDependencies=no\n",
    )
    .unwrap();
    let dropin = format!(
        "[Service]\nExecStart=\nExecStart={} --state-dir {} --vmm {} --part-io {} \
         --memory-budget-mib 256 --disk-image {}\nStateDirectory=\nReadWritePaths=\n\
         ReadWritePaths={} {}\nStandardOutput=append:{}\nStandardError=inherit\n",
        partd_bin.display(),
        state.display(),
        vmm_bin.display(),
        io_bin.display(),
        img.display(),
        state.display(),
        images.display(),
        dir.join("partd.log").display(),
    );
    std::fs::write(units.join("partd.service.d/paths.conf"), &dropin).unwrap();
    let id = format!("partvisor-systemd-test.{}", std::process::id());
    let c = Container::boot(dir, &id);
    let partd_log = || std::fs::read_to_string(dir.join("partd.log")).unwrap_or_default();
    let started = c.systemctl(&["start", "partd.service"]);
    assert!(
        started.status.success(),
        "systemctl start partd: {}\n{}\npartd log:\n{}",
        String::from_utf8_lossy(&started.stderr),
        String::from_utf8_lossy(&c.systemctl(&["status", "partd.service"]).stdout),
        partd_log()
    );
    let ctl = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(&built.partctl)
            .arg("--socket")
            .arg(state.join("partd.sock"))
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "partctl {args:?}: {}\npartd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            partd_log()
        );
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let define = |name: &str, cmdline: &str, extra: &str| -> serde_json::Value {
        let def = dir.join(format!("{name}.toml"));
        std::fs::write(
            &def,
            format!(
                "name = \"{name}\"\nmemory_mib = 64\nkernel = \"{}\"\ncmdline = \"{cmdline}\"\n\
                 [[nic]]\nswitch = \"lan\"\n{extra}",
                guest.display(),
            ),
        )
        .unwrap();
        ctl(&["create", def.to_str().unwrap()])
    };
    let created = define(
        "web",
        "blk=write:7:64 blk=verify:7:64 net=recv:100 stay",
        &format!("[[disk]]\nimage = \"{}\"\n", img.display()),
    );
    let web_mac = created["holdings"]["macs"][0].as_str().unwrap().to_string();
    define("peer", &format!("net=send:{web_mac}:100:64 stay"), "");
    let v = ctl(&["start", "web"]);
    let p = ctl(&["start", "peer"]);
    let boot = Duration::from_secs(120);
    let text = partvisor_e2e::wait_console(&partvisor_e2e::console_of(&v), "stay: idle", boot);
    assert!(text.contains("blk: verified 64 blocks ok"), "{text}");
    assert!(
        text.contains("net: received 100 frames ok lost=0 bad=0 dup=0"),
        "{text}"
    );
    let sent = partvisor_e2e::wait_console(&partvisor_e2e::console_of(&p), "stay: idle", boot);
    assert!(sent.contains("net: sent 100 frames"), "{sent}");
    // The guest's writes reached the image outside the state directory.
    let data = std::fs::read(&img).unwrap();
    assert!(data[7 * 512..(7 + 64) * 512].iter().any(|&b| b != 0));
    // The monitor (a pid of the container's namespace) is jailed and sits
    // in a cgroup below the unit's, which systemd delegated.
    let vmm = v["vmm"]["pid"].as_u64().unwrap().to_string();
    assert_ne!(
        proc_field(&c, &vmm, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(proc_field(&c, &vmm, "NoNewPrivs"), "1");
    assert_eq!(proc_field(&c, &vmm, "Seccomp"), "2");
    assert_eq!(proc_field(&c, &vmm, "CapEff"), "0000000000000000");
    let cgroup = c.exec(&["cat", &format!("/proc/{vmm}/cgroup")]);
    let cgroup = String::from_utf8_lossy(&cgroup.stdout);
    assert!(
        cgroup.contains(&format!("/system.slice/partd.service/partvisor/web.{vmm}")),
        "{cgroup}"
    );
    // partd killed: systemd starts it again (Restart=on-failure) inside the
    // same delegated cgroup, and it takes the running partitions back.
    let main_pid = || {
        let out = c.systemctl(&["show", "-P", "MainPID", "partd.service"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let first = main_pid();
    assert_ne!(first, "0");
    let killed = c.systemctl(&["kill", "--kill-whom=main", "--signal=KILL", "partd.service"]);
    assert!(killed.status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let restarted = loop {
        let out = Command::new(&built.partctl)
            .arg("--socket")
            .arg(state.join("partd.sock"))
            .args(["--json", "show", "web"])
            .output()
            .unwrap();
        let now = main_pid();
        if out.status.success() && now != "0" && now != first {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "partd did not come back: {}\n{}",
            String::from_utf8_lossy(&c.systemctl(&["status", "partd.service"]).stdout),
            partd_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(restarted["state"], "running", "{restarted}");
    assert_eq!(restarted["vmm"]["pid"], v["vmm"]["pid"], "{restarted}");
    for name in ["web", "peer"] {
        ctl(&["stop", name, "--force"]);
    }
    let stopped = c.systemctl(&["stop", "partd.service"]);
    assert!(stopped.status.success());
    let cgroups = std::fs::read_to_string(dir.join("cgroups")).unwrap();
    assert!(!cgroups.trim().is_empty());
    drop(c);
    for cg in cgroups.lines() {
        assert!(!Path::new(cg).exists(), "container cgroup {cg} left behind");
    }
    drop(scratch);
    if base != target_tmp {
        // Ours, and empty now.
        let _ = std::fs::remove_dir(&base);
    }
}
