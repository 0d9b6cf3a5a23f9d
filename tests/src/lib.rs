//! # partvisor-e2e: end-to-end tests across processes
//!
//! Drives the real binaries — `partd` (coordinator), `partctl` (CLI),
//! `part-vmm` (one monitor per partition) booting the project's test guest —
//! the way an operator does, and checks the results through the resource
//! database's read API (`resource_db::View`), `/proc` and the guest's
//! console. It realises the checks of issue 5 for seed 001's command side
//! (one writer, watchdogs, a coordinator that can restart under running
//! partitions).
//!
//! This library is the harness: it builds the binaries of the other
//! packages once (a nested `cargo build` into the same target dir, because
//! `CARGO_BIN_EXE_*` only covers a package's own binaries), runs a partd in
//! a temporary state dir, and cleans up every process it started.
//!
//! It must never touch a system partd (`/var/lib/partvisor`), leave a
//! process running after a test, or boot two guests from two tests at once
//! (use [`vm_lock`]).

// A test harness: a failed set-up step is a failed test, so panicking with
// the step's message is the intended behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use partvisor_runtime::sync::MutexExt;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Paths of the binaries under test.
#[derive(Debug)]
pub struct Bins {
    pub partd: PathBuf,
    pub partctl: PathBuf,
    pub part_vmm: PathBuf,
    pub part_io: PathBuf,
}

/// Builds (if needed) and locates partd, partctl and part-vmm in the target
/// dir this test binary was built into.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable under target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(p) => p.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--profile", &profile, "--bins"])
            .args([
                "-p", "partd", "-p", "partctl", "-p", "part-vmm", "-p", "part-io",
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            .status()
            .expect("run cargo build for partd/partctl/part-vmm");
        assert!(status.success(), "building partd/partctl/part-vmm failed");
        let b = Bins {
            partd: profile_dir.join("partd"),
            partctl: profile_dir.join("partctl"),
            part_vmm: profile_dir.join("part-vmm"),
            part_io: profile_dir.join("part-io"),
        };
        for p in [&b.partd, &b.partctl, &b.part_vmm, &b.part_io] {
            assert!(p.is_file(), "{} missing after the build", p.display());
        }
        b
    })
}

/// Serialises tests that boot guests (2-core machines).
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static VM: Mutex<()> = Mutex::new(());
    VM.locked()
}

/// The test guest's ELF.
pub fn guest() -> &'static Path {
    partvisor_test_guest::guest_elf()
}

/// A partd running in its own temporary state dir.
pub struct Partd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Partd {
    /// Starts partd with fast supervision settings plus `extra` flags.
    pub fn start(extra: &[&str]) -> Partd {
        let dir = tempfile::Builder::new()
            .prefix("pv-e2e-")
            .tempdir()
            .expect("temp state dir");
        let socket = dir.path().join("partd.sock");
        let mut args: Vec<String> = vec![
            "--state-dir".into(),
            dir.path().display().to_string(),
            "--ping-interval-ms".into(),
            "200".into(),
        ];
        if !extra.contains(&"--vmm") {
            args.extend(["--vmm".into(), bins().part_vmm.display().to_string()]);
        }
        if !extra.contains(&"--part-io") {
            args.extend(["--part-io".into(), bins().part_io.display().to_string()]);
        }
        if !extra.contains(&"--memory-budget-mib") {
            args.extend(["--memory-budget-mib".into(), "1024".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = Partd {
            dir,
            socket,
            args,
            child: None,
        };
        p.spawn();
        p
    }

    /// The state dir.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("partd.log"))
            .expect("partd log");
        let child = Command::new(&bins().partd)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn partd");
        self.child = Some(child);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("partd exited early ({st}); log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("partd did not serve within 20 s; log:\n{}", self.log());
    }

    /// partd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("partd.log")).unwrap_or_default()
    }

    /// partd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILLs partd (the monitors keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts partd again on the same state dir.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Runs partctl against this partd.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(&bins().partctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run partctl")
    }

    /// Runs partctl, asserts success and returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "partctl {args:?} failed: {}\npartd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs partctl, asserts it failed and returns its stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(!out.status.success(), "partctl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs partctl with --json, asserts success and parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("partctl {a:?}: not JSON ({e}):\n{out}"))
    }

    /// A read-only view of partd's resource database.
    pub fn view(&self) -> resource_db::View {
        resource_db::View::open(self.path().join("resources.db"))
            .expect("open the resource db view")
    }

    /// What the resource database says `name` holds.
    pub fn holdings(&self, name: &str) -> resource_db::Holdings {
        self.view()
            .holdings(&resource_db::PartitionId::new(name).expect("partition name"))
            .expect("read holdings")
    }

    /// partctl as a path other uids can execute: the built one when every
    /// folder above it is world-searchable, else a copy in the state dir.
    pub fn partctl_for_others(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let built = bins().partctl.clone();
        let reachable = built
            .ancestors()
            .skip(1)
            .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
        if reachable {
            return built;
        }
        let copy = self.path().join("partctl");
        if !copy.exists() {
            std::fs::copy(&built, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }

    /// `partctl --socket <partd's> ARGS` as `uid`:`gid` with no
    /// supplementary groups (util-linux `setpriv`).
    pub fn run_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
            ])
            .arg(self.partctl_for_others())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run setpriv (util-linux)")
    }

    /// Writes `name`'s definition (see [`Partd::definition`]) and creates
    /// the partition with `partctl create`.
    pub fn create(&self, name: &str, extra: &str) {
        let def = self.definition(name, extra);
        self.ctl_ok(&["create", def.to_str().unwrap()]);
    }

    /// Writes a 64 MiB definition with `cmdline` and extra TOML into the
    /// state dir and returns its path.
    pub fn definition_with(&self, name: &str, cmdline: &str, extra: &str) -> PathBuf {
        let p = self.path().join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nmemory_mib = 64\nkernel = \"{}\"\ncmdline = \"{cmdline}\"\n{extra}\n",
            guest().display()
        );
        std::fs::write(&p, text).expect("write definition");
        p
    }

    /// Writes a definition file into the state dir and returns its path.
    pub fn definition(&self, name: &str, extra: &str) -> PathBuf {
        let p = self.path().join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nkernel = \"{}\"\ncmdline = \"stay\"\n{extra}\n",
            guest().display()
        );
        std::fs::write(&p, text).expect("write definition");
        p
    }

    /// Waits until `name`'s state is `want` (by `partctl show --json`).
    pub fn wait_state(&self, name: &str, want: &str, timeout: Duration) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let v = self.ctl_json(&["show", name]);
            if v["state"] == want {
                return v;
            }
            assert!(
                t0.elapsed() < timeout,
                "{name} is {} after {timeout:?}, expected {want}",
                v["state"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// pids of monitors partd recorded (alive or not).
    fn recorded_vmm_pids(&self) -> Vec<u32> {
        self.recorded_pids("partitions", "vmm.json")
    }

    /// pids of part-io processes partd recorded (alive or not).
    fn recorded_io_pids(&self) -> Vec<u32> {
        let mut p = self.recorded_pids("partitions", "blk.json");
        p.extend(self.recorded_pids("switches", "net.json"));
        // The host's one vsock relay: `vsock/vsock.json`.
        let relay = std::fs::read_to_string(self.path().join("vsock/vsock.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pid"].as_u64())
            .and_then(|p| u32::try_from(p).ok());
        p.extend(relay);
        p
    }

    fn recorded_pids(&self, folder: &str, file: &str) -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir(self.path().join(folder)) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join(file)).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter_map(|v| v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
            .collect()
    }
}

impl Drop for Partd {
    fn drop(&mut self) {
        self.kill9();
        // Monitors outlive partd by design: end the ones this test started.
        for pid in self.recorded_vmm_pids() {
            if is_part_vmm(pid) {
                kill(pid, libc::SIGKILL);
            }
        }
        // So do I/O partitions.
        for pid in self.recorded_io_pids() {
            if is_comm(pid, "part-io") {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Whether `pid` is a live part-vmm.
pub fn is_part_vmm(pid: u32) -> bool {
    is_comm(pid, "part-vmm")
}

/// Whether `pid` is a live process named `comm`.
pub fn is_comm(pid: u32, comm: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == comm)
        .unwrap_or(false)
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes plain integers.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The console socket in a `show --json` view.
pub fn console_of(v: &serde_json::Value) -> PathBuf {
    v["vmm"]["console_socket"]
        .as_str()
        .expect("console socket in the view")
        .into()
}

/// Reads a partition's console (its backlog first) until `needle` appears.
pub fn wait_console(socket: &Path, needle: &str, timeout: Duration) -> String {
    let t0 = Instant::now();
    let mut s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) => {
                assert!(t0.elapsed() < timeout, "console {}: {e}", socket.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains(needle) {
        assert!(
            t0.elapsed() < timeout,
            "console never showed {needle:?} within {timeout:?}; got:\n{text}"
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("console closed before {needle:?}; got:\n{text}"),
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
    }
    text
}

/// Waits until `pid` is gone.
pub fn wait_gone(pid: u32, timeout: Duration) {
    let t0 = Instant::now();
    while alive(pid) {
        assert!(
            t0.elapsed() < timeout,
            "pid {pid} still alive after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to 10 s for `pid` to end; whether it did.
pub fn wait_gone_quietly(pid: u32) -> bool {
    let t0 = Instant::now();
    while alive(pid) {
        if t0.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
