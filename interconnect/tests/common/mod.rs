//! Harness: drives `ic-peer` processes over stdin/stdout.
#![allow(dead_code)]

pub mod netns;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use interconnect::{DirectoryServer, Transport};

pub const PEER: &str = env!("CARGO_BIN_EXE_ic-peer");

pub struct Proc {
    pub name: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Proc {
    /// The raw-syscall hostile peer (`ic-peer hostile-shm`).
    pub fn hostile() -> Proc {
        let mut c = Command::new(PEER);
        c.arg("hostile-shm");
        Proc::spawn_cmd(c, "hostile")
    }

    /// An `ic-peer` running as `uid` (and its gid), for ownership tests.
    pub fn spawn_as(dir: &Path, name: &str, uid: u32) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(PEER);
        c.args([dir.to_str().unwrap(), name, "127.0.0.1"]);
        c.uid(uid).gid(uid);
        Proc::spawn_cmd(c, name)
    }

    pub fn spawn(dir: &Path, name: &str, netns: Option<(&str, &str)>) -> Proc {
        let cmd = match netns {
            Some((ns, ip)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, PEER, dir.to_str().unwrap(), name, ip]);
                c
            }
            None => {
                let mut c = Command::new(PEER);
                c.args([dir.to_str().unwrap(), name, "127.0.0.1"]);
                c
            }
        };
        Proc::spawn_cmd(cmd, name)
    }

    fn spawn_cmd(mut cmd: Command, name: &str) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ic-peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.into(),
            child,
            stdin,
            lines: rx,
        }
    }

    /// Sends a command without waiting for the answer.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for the next answer.
    pub fn answer(&mut self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("{}: no answer within {timeout:?}", self.name))
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.answer(Duration::from_secs(60))
    }

    /// Runs a command that must succeed; returns the words after "ok".
    pub fn ok(&mut self, line: &str) -> Vec<String> {
        let r = self.cmd(line);
        assert!(
            r.starts_with("ok"),
            "{}: `{line}` answered `{r}`",
            self.name
        );
        r.split_whitespace().skip(1).map(String::from).collect()
    }

    /// Registers a region; returns its rkey.
    pub fn reg(&mut self, tag: &str, size: u64, access: &str, fill: u8) -> u32 {
        self.ok(&format!("reg {tag} {size} {access} {fill}"))[1]
            .parse()
            .unwrap()
    }

    /// Polls `n` completions; returns them as "wr_id,status,opcode,len,imm".
    pub fn poll(&mut self, n: usize, timeout_ms: u64) -> Vec<String> {
        let w = self.ok(&format!("poll {n} {timeout_ms}"));
        if w.len() < 2 {
            return Vec::new();
        }
        w[1].split(';').map(String::from).collect()
    }

    /// Distinct byte values in a range.
    pub fn distinct(&mut self, tag: &str, off: u64, len: u64) -> String {
        let r = self.cmd(&format!("sum {tag} {off} {len}"));
        let i = r.find('{').unwrap_or_else(|| panic!("bad sum answer {r}"));
        r[i..].to_string()
    }

    /// CPU time (user + system) the process has used, in milliseconds.
    pub fn cpu_ms(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after_comm.split_whitespace().collect();
        // fields 14 and 15 of stat (utime, stime) are 11 and 12 after the comm
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        ticks * 1000 / hz
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed peer cannot remove its listener sockets: do it for it.
        let prefix = format!("ic-{}-", self.child.id());
        if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

static N: AtomicU32 = AtomicU32::new(0);

/// The pair secret of a resolution in the hex the hostile peer takes.
pub fn secret_hex(r: &interconnect::Resolved) -> String {
    let bytes: Vec<u8> = serde_json::from_value(serde_json::to_value(&r.secret).unwrap()).unwrap();
    assert_eq!(bytes.len(), 32);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn dir_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "ic-test-dir-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A directory and two connected peers: `srv` listening as "svc" (allowing
/// "cli"), `cli` connected to it over `t`.
pub struct Pair {
    pub srv: Proc,
    pub cli: Proc,
    pub t: Transport,
    pub dir: DirectoryServer,
}

pub fn tname(t: Transport) -> &'static str {
    match t {
        Transport::Shm => "shm",
        Transport::Tcp => "tcp",
    }
}

pub fn pair_with(t: Transport, netns: Option<[(&str, &str); 2]>) -> Pair {
    let path = dir_path();
    let dir = DirectoryServer::serve(&path).unwrap();
    let mut srv = Proc::spawn(&path, "svc-host", netns.map(|n| n[0]));
    let mut cli = Proc::spawn(&path, "cli", netns.map(|n| n[1]));
    srv.ok("listen svc cli");
    srv.send("accept 10000");
    let c = cli.ok(&format!("connect svc {}", tname(t)));
    assert_eq!(c[0], format!("Some({t:?})"));
    let a = srv.answer(Duration::from_secs(10));
    assert_eq!(a, "ok cli");
    Pair { srv, cli, t, dir }
}

pub fn pair(t: Transport) -> Pair {
    pair_with(t, None)
}
