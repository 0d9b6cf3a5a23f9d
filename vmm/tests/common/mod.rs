//! Harness for tests that run the `part-vmm` binary. VM-booting tests take
//! [`vm_lock`] so that only one guest runs at a time (the machines have two
//! cores); bad-input tests fail before any VM exists and need no lock.
#![allow(dead_code)]

use partvisor_runtime::sync::MutexExt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static VM_LOCK: Mutex<()> = Mutex::new(());

/// Serialises VM-booting tests within this test binary.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    VM_LOCK.locked()
}

/// Functional deadline for one guest run; generous, and configurable through
/// `PARTVISOR_TEST_TIMEOUT_SECS` for slow hosts.
pub fn deadline() -> Duration {
    let secs = std::env::var("PARTVISOR_TEST_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

pub fn part_vmm() -> &'static str {
    env!("CARGO_BIN_EXE_part-vmm")
}

pub fn guest() -> PathBuf {
    partvisor_test_guest::guest_elf().to_path_buf()
}

/// A finished run.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub serial: String,
    pub log: String,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// The serial lines that start with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<&str> {
        self.serial
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// The single serial line starting with `prefix`, without the prefix.
    pub fn value(&self, prefix: &str) -> &str {
        let l = self.lines(prefix);
        assert_eq!(
            l.len(),
            1,
            "expected one `{prefix}` line in:\n{}",
            self.serial
        );
        l[0][prefix.len()..].trim()
    }

    /// The `exit:` line part-vmm logged.
    pub fn exit_line(&self) -> &str {
        self.log
            .lines()
            .find(|l| l.contains("exit: reason="))
            .unwrap_or_else(|| panic!("no exit line in log:\n{}", self.log))
    }
}

/// A unique scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("partvisor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(part_vmm());
    c.args(args)
        .env("PARTVISOR_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child` up to the deadline; kills it and panics on timeout.
pub fn wait(mut child: Child, what: &str) -> Run {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > deadline() {
            let _ = child.kill();
            let _ = child.wait();
            let serial = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            let log = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!(
                "{what}: no exit within {:?}\nserial:\n{serial}\nlog:\n{log}",
                deadline()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        serial: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        log: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
    }
}

/// Runs part-vmm with `args` to completion.
pub fn run(args: &[&str]) -> Run {
    let child = command(args).spawn().expect("spawn part-vmm");
    wait(child, &format!("part-vmm {args:?}"))
}

/// Runs the test guest with `cmdline` and extra flags.
pub fn run_guest(cmdline: &str, extra: &[&str]) -> Run {
    let g = guest();
    let mut args = vec!["--kernel", g.to_str().unwrap(), "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run(&args)
}

/// Reads from `r` until a complete line starts with `prefix` (or the deadline).
pub fn read_until(r: &mut impl Read, acc: &mut String, prefix: &str) {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    // Only complete lines count: a chunk may end in the middle of one.
    let complete = |acc: &str| acc[..acc.rfind('\n').map_or(0, |i| i + 1)].to_string();
    while !complete(acc).lines().any(|l| l.starts_with(prefix)) {
        assert!(
            start.elapsed() < deadline(),
            "no `{prefix}` line in:\n{acc}"
        );
        match r.read(&mut buf) {
            Ok(0) => panic!("output ended before `{prefix}`:\n{acc}"),
            Ok(n) => acc.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Sum of user+system CPU ticks of process `pid` (all threads).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after ") ".
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(t > 0);
    t as u64
}

pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(data).unwrap();
    p
}

/// The `part-io` binary beside `part-vmm`, built on demand when this test
/// binary runs alone (`cargo test -p part-vmm`).
pub fn part_io() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _b = BUILD.locked();
    let path = Path::new(part_vmm()).with_file_name("part-io");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "part-io", "--bin", "part-io"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p part-io");
        assert!(st.success(), "cargo build -p part-io failed");
    }
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// A backend process killed when dropped.
pub struct Backend {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Backend {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits until every socket in `socks` exists (the backend listens).
pub fn wait_for_sockets(socks: &[&Path]) {
    let start = Instant::now();
    while !socks.iter().all(|s| s.exists()) {
        assert!(
            start.elapsed() < deadline(),
            "backend sockets {socks:?} never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns `part-io` with `args`, its log in `log`.
pub fn spawn_part_io(args: &[String], log: PathBuf) -> Backend {
    let child = Command::new(part_io())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env("NO_COLOR", "1")
        .spawn()
        .expect("spawn part-io");
    Backend { child, log }
}

/// Starts `part-io blk` with one `--export` per spec, logging to `dir`.
pub fn start_part_io(dir: &Path, exports: &[String]) -> Backend {
    let mut args = vec!["blk".to_string()];
    for e in exports {
        args.extend(["--export".to_string(), e.clone()]);
    }
    spawn_part_io(&args, dir.join("part-io.log"))
}

/// part-vmm with the test guest, `cmdline` and extra flags, not yet started.
pub fn guest_command(cmdline: &str, extra: &[&str]) -> Command {
    let g = guest();
    let mut args = vec!["--kernel", g.to_str().unwrap(), "--cmdline", cmdline];
    args.extend_from_slice(extra);
    command(&args)
}

/// A running part-vmm whose serial output is read line by line.
pub struct Running {
    pub child: Child,
    /// Serial output read so far.
    pub serial: String,
    out: std::process::ChildStdout,
}

impl Running {
    /// Spawns `cmd` and reads its serial output until a line starts with `until`.
    pub fn start(cmd: &mut Command, until: &str) -> Running {
        let mut child = cmd.spawn().expect("spawn part-vmm");
        let out = child.stdout.take().expect("piped stdout");
        let mut r = Running {
            child,
            serial: String::new(),
            out,
        };
        r.read_until(until);
        r
    }

    pub fn read_until(&mut self, prefix: &str) {
        read_until(&mut self.out, &mut self.serial, prefix);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the exit; the returned serial holds everything read.
    pub fn finish(mut self, what: &str) -> Run {
        self.child.stdout = Some(self.out);
        let mut r = wait(self.child, what);
        r.serial = self.serial + &r.serial;
        r
    }
}

/// Starts one `part-io net` switch with `ports` (socket, MAC) and a stats
/// socket at `dir/<name>-stats.sock`.
pub fn start_switch(dir: &Path, name: &str, ports: &[(&Path, &str)]) -> (Backend, PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let stats = dir.join(format!("{name}-stats.sock"));
    let mut args = vec!["net".to_string()];
    for (sock, mac) in ports {
        args.extend([
            "--port".to_string(),
            format!("socket={},mac={mac}", sock.display()),
        ]);
    }
    args.extend(["--stats-socket".to_string(), stats.display().to_string()]);
    let backend = spawn_part_io(&args, log);
    let mut socks: Vec<&Path> = ports.iter().map(|(s, _)| *s).collect();
    socks.push(&stats);
    wait_for_sockets(&socks);
    (backend, stats)
}

/// The switch's counters (one JSON document from its stats socket).
pub fn switch_stats(stats: &Path) -> serde_json::Value {
    // The switch answers every connection with one document and closes it.
    let mut s = std::os::unix::net::UnixStream::connect(stats).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("stats {text:?}: {e}"))
}

/// The counters of the port with MAC `mac`.
pub fn port_stats(stats: &Path, mac: &str) -> serde_json::Value {
    let all = switch_stats(stats);
    all["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["mac"] == mac)
        .cloned()
        .unwrap_or_else(|| panic!("no port {mac} in {all}"))
}

/// Waits until the port with MAC `mac` can take frames.
pub fn wait_rx_ready(stats: &Path, mac: &str) {
    let start = Instant::now();
    while port_stats(stats, mac)["rx_ready"] != true {
        assert!(
            start.elapsed() < deadline(),
            "port {mac} never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Counter `name` of the vsock port with `cid` (a `part-io vsock` stats
/// socket).
pub fn vsock_port_stat(stats: &Path, cid: u64, name: &str) -> serde_json::Value {
    let s = switch_stats(stats);
    s["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["cid"] == cid)
        .unwrap_or_else(|| panic!("no port with cid {cid}: {s}"))[name]
        .clone()
}

/// part-vmm's flags for a vhost-user vsock device on `sock` with `cid`.
pub fn vsock_args(sock: &Path, cid: u32) -> [String; 4] {
    [
        "--vhost-user-vsock".into(),
        sock.display().to_string(),
        "--vsock-cid".into(),
        cid.to_string(),
    ]
}

/// `part-io vsock` with one `--port` per spec (`socket=PATH,cid=N[,...]`)
/// and a stats socket at `stats`, logging to `dir/part-io.log`; returns
/// once every socket listens.
pub fn spawn_vsock_relay(dir: &Path, ports: &[String], stats: &Path) -> Backend {
    let mut args = vec!["vsock".to_string()];
    for p in ports {
        args.extend(["--port".to_string(), p.clone()]);
    }
    args.extend(["--stats-socket".to_string(), stats.display().to_string()]);
    let backend = spawn_part_io(&args, dir.join("part-io.log"));
    let sockets: Vec<PathBuf> = ports
        .iter()
        .filter_map(|p| p.split(',').find_map(|kv| kv.strip_prefix("socket=")))
        .map(PathBuf::from)
        .chain([stats.to_path_buf()])
        .collect();
    let refs: Vec<&Path> = sockets.iter().map(PathBuf::as_path).collect();
    wait_for_sockets(&refs);
    backend
}
