//! A hostile shm peer that uses raw system calls only — no `interconnect`
//! or `channels` code — to attack an endpoint. Driven by stdin commands,
//! answers on stdout:
//! * `hello <socket> <from> <to> [secret-hex]`: handshake by hand (JSON +
//!   SCM_RIGHTS), proving `from` with the pair secret if one is given (an
//!   all-zero proof otherwise).
//! * `expose <id> <len> <fill> <sealed:0|1>`: offer a memfd as a send source.
//! * `write <rkey> <raddr> <len> <src_id> <src_off>` / `read <rkey> <raddr> <len>`:
//!   post a raw request and print the target's status code.
//! * `window_rw`: try to get write access to the target's read window.
//! * `answer_wrong`: answer the target's next request with a wrong sequence.
//! * `forge_tail`: write an impossible producer index into our ring.
//! * `hello_tcp <addr> <from> <to> [secret-hex]`, then `write`/`read` (payload inline) and
//!   `lie_len`: the same over a raw TCP stream.
use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use std::os::fd::{AsFd, AsRawFd, IntoRawFd};

const SLOTS: u64 = 1024;
const SLOT: u64 = 72;
const HDR: u64 = 256;
const RING_BYTES: u64 = HDR + SLOTS * SLOT;
const WINDOW: u64 = 4 << 20;

struct Raw {
    sock: UnixStream,
    tx: *mut u8,
    rx: *mut u8,
    peer_bell: i32,
    peer_window_fd: i32,
    tail: u64,
    head: u64,
    seq: u64,
}

/// A memfd of `len` bytes as a raw fd (-1 if it cannot be made), sealed
/// against resizing only if `seal`: the hostile peer offers both kinds.
fn memfd(len: u64, seal: bool) -> i32 {
    let Ok(fd) = channels::memfd::unsealed("hostile", len) else {
        return -1;
    };
    if seal && channels::memfd::add_seals(fd.as_fd(), channels::memfd::REQUIRED_SEALS).is_err() {
        return -1;
    }
    fd.into_raw_fd()
}

fn map(fd: i32, len: u64, prot: i32) -> *mut u8 {
    // SAFETY: mapping an fd we hold; failure returns MAP_FAILED, checked by callers.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            prot,
            libc::MAP_SHARED,
            fd,
            0,
        )
        .cast()
    }
}

fn sendmsg(sock: &UnixStream, data: &[u8], fds: &[i32]) -> isize {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: building a msghdr with a cmsg buffer large enough for 8 fds.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let space = libc::CMSG_SPACE((fds.len() * 4) as u32) as usize;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<i32>(),
                fds.len(),
            );
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, 0)
    }
}

fn recvmsg(sock: &UnixStream, buf: &mut [u8]) -> (isize, Vec<i32>) {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: receiving into our buffers; cmsg parsing bounded by msg_controllen.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, 0);
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(*libc::CMSG_DATA(c).cast::<i32>().add(i));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        (n, fds)
    }
}

fn put(p: *mut u8, off: u64, b: &[u8]) {
    // SAFETY: callers stay inside the ring mapping.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p.add(off as usize), b.len()) }
}

fn get_u64(p: *mut u8, off: u64) -> u64 {
    // SAFETY: callers stay inside the ring mapping; volatile for cross-process data.
    unsafe { std::ptr::read_volatile(p.add(off as usize).cast::<u64>()) }
}

/// Encodes the 64-byte wire message by hand (field by field, like a
/// foreign implementation would).
#[allow(clippy::too_many_arguments)]
fn msg(
    kind: u8,
    seq: u64,
    rkey: u32,
    raddr: u64,
    len: u64,
    src_id: u64,
    src_off: u64,
    status: u8,
) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0] = kind;
    b[2] = status;
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&rkey.to_le_bytes());
    b[24..32].copy_from_slice(&raddr.to_le_bytes());
    b[32..40].copy_from_slice(&len.to_le_bytes());
    b[40..48].copy_from_slice(&src_id.to_le_bytes());
    b[48..56].copy_from_slice(&src_off.to_le_bytes());
    b
}

/// The handshake's proof, computed from the transcript documented in
/// `interconnect::proof` (written out here, not taken from the library, so
/// the two implementations check each other).
fn proof(secret_hex: Option<&str>, challenge: &[u8], t: &str, from: &str, to: &str) -> String {
    use hmac::Mac;
    let nonce: Vec<u8> = serde_json::from_slice::<serde_json::Value>(challenge)
        .ok()
        .and_then(|v| serde_json::from_value(v["nonce"].clone()).ok())
        .unwrap_or_default();
    let mut out = [0u8; 32];
    if let Some(secret) = secret_hex.and_then(unhex) {
        if let Ok(mut m) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret) {
            let fields: [&[u8]; 5] = [
                b"partvisor-ic hello v1",
                &nonce,
                t.as_bytes(),
                from.as_bytes(),
                to.as_bytes(),
            ];
            for f in fields {
                m.update(&(f.len() as u64).to_le_bytes());
                m.update(f);
            }
            out = m.finalize().into_bytes().into();
        }
    }
    serde_json::to_string(&out).unwrap_or_default()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

impl Raw {
    fn hello(path: &str, from: &str, to: &str, secret: Option<&str>) -> Result<Raw, String> {
        let sock = UnixStream::connect(path).map_err(|e| e.to_string())?;
        let mut challenge = [0u8; 4096];
        let (n, _) = recvmsg(&sock, &mut challenge);
        let challenge = &challenge[..n.max(0) as usize];
        let ring = memfd(RING_BYTES, true);
        let tx = map(ring, RING_BYTES, libc::PROT_READ | libc::PROT_WRITE);
        put(tx, 0, &0x7076_7269_6e67_0001u64.to_ne_bytes());
        put(tx, 8, &(SLOT as u32).to_ne_bytes());
        put(tx, 12, &(SLOTS as u32).to_ne_bytes());
        // SAFETY: plain eventfd creation.
        let bell = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        let win = memfd(WINDOW, true);
        let proof = proof(secret, challenge, "shm", from, to);
        let hello = format!(r#"{{"from":"{from}","to":"{to}","transport":"Shm","proof":{proof}}}"#);
        if sendmsg(&sock, hello.as_bytes(), &[ring, bell, win]) < 0 {
            return Err("sendmsg failed".into());
        }
        let mut buf = [0u8; 4096];
        let (n, fds) = recvmsg(&sock, &mut buf);
        let reply = String::from_utf8_lossy(&buf[..n.max(0) as usize]).to_string();
        if !reply.contains("\"ok\":true") || fds.len() != 3 {
            return Err(format!("refused: {reply}"));
        }
        let rx = map(fds[0], RING_BYTES, libc::PROT_READ | libc::PROT_WRITE);
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        Ok(Raw {
            sock,
            tx,
            rx,
            peer_bell: fds[1],
            peer_window_fd: fds[2],
            tail: 0,
            head: 0,
            seq: 0,
        })
    }

    fn push(&mut self, m: &[u8; 64]) {
        let slot = HDR + (self.tail % SLOTS) * SLOT;
        put(self.tx, slot, &64u32.to_ne_bytes());
        put(self.tx, slot + 4, m);
        self.tail += 1;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        put(self.tx, 64, &self.tail.to_ne_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let one = 1u64;
        // SAFETY: writing 8 bytes to the peer's eventfd.
        unsafe { libc::write(self.peer_bell, (&one as *const u64).cast(), 8) };
    }

    fn pop(&mut self, timeout: Duration) -> Option<[u8; 64]> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if get_u64(self.rx, 64) > self.head {
                let slot = HDR + (self.head % SLOTS) * SLOT;
                let mut m = [0u8; 64];
                // SAFETY: inside the peer's ring mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.rx.add(slot as usize + 4),
                        m.as_mut_ptr(),
                        64,
                    )
                };
                self.head += 1;
                put(self.rx, 128, &self.head.to_ne_bytes());
                return Some(m);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    }

    fn request(&mut self, m: [u8; 64]) -> String {
        self.push(&m);
        loop {
            match self.pop(Duration::from_secs(5)) {
                None => return "err no response".into(),
                Some(r) if r[0] == 4 => {
                    return format!(
                        "ok {} {}",
                        u64::from_le_bytes(r[8..16].try_into().unwrap_or([0; 8])),
                        r[2]
                    );
                }
                Some(_) => continue,
            }
        }
    }
}

/// The same attacks over a raw TCP stream (hand-framed messages).
struct RawTcp {
    s: std::net::TcpStream,
    seq: u64,
}

impl RawTcp {
    fn hello(addr: &str, from: &str, to: &str, secret: Option<&str>) -> Result<RawTcp, String> {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut frame = || -> Result<Vec<u8>, String> {
            let mut l = [0u8; 4];
            s.read_exact(&mut l).map_err(|e| e.to_string())?;
            let mut v = vec![0u8; u32::from_le_bytes(l).min(4096) as usize];
            s.read_exact(&mut v).map_err(|e| e.to_string())?;
            Ok(v)
        };
        let challenge = frame()?;
        let proof = proof(secret, &challenge, "tcp", from, to);
        let hello = format!(r#"{{"from":"{from}","to":"{to}","transport":"Tcp","proof":{proof}}}"#);
        s.write_all(&(hello.len() as u32).to_le_bytes())
            .map_err(|e| e.to_string())?;
        s.write_all(hello.as_bytes()).map_err(|e| e.to_string())?;
        let mut l = [0u8; 4];
        s.read_exact(&mut l).map_err(|e| e.to_string())?;
        let mut v = vec![0u8; u32::from_le_bytes(l).min(4096) as usize];
        s.read_exact(&mut v).map_err(|e| e.to_string())?;
        let reply = String::from_utf8_lossy(&v).to_string();
        if !reply.contains("\"ok\":true") {
            return Err(format!("refused: {reply}"));
        }
        Ok(RawTcp { s, seq: 0 })
    }

    fn request(&mut self, m: [u8; 64], payload: &[u8]) -> String {
        use std::io::Read;
        if self
            .s
            .write_all(&m)
            .and_then(|_| self.s.write_all(payload))
            .is_err()
        {
            return "err write".into();
        }
        loop {
            let mut h = [0u8; 64];
            if let Err(e) = self.s.read_exact(&mut h) {
                return format!("err no response: {e}");
            }
            let len = u64::from_le_bytes(h[32..40].try_into().unwrap_or([0; 8]));
            if h[40..48] == [0xff; 8] {
                let mut d = vec![0u8; len.min(64 << 20) as usize];
                if self.s.read_exact(&mut d).is_err() {
                    return "err short data".into();
                }
            }
            if h[0] == 4 {
                return format!(
                    "ok {} {}",
                    u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8])),
                    h[2]
                );
            }
        }
    }
}

fn cmd_tcp(raw: &mut RawTcp, a: &[&str]) -> Result<String, String> {
    let n = |i: usize| {
        a.get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(format!("arg {i}"))
    };
    raw.seq += 1;
    match a.first().copied() {
        Some("write") => {
            let m = msg(2, raw.seq, n(1)? as u32, n(2)?, n(3)?, 0, 0, 0);
            Ok(raw.request(m, &vec![0xee; n(3)? as usize]))
        }
        Some("read") => {
            let m = msg(3, raw.seq, n(1)? as u32, n(2)?, n(3)?, 0, 0, 0);
            Ok(raw.request(m, &[]))
        }
        Some("lie_len") => {
            // Announce a payload larger than any message may be.
            let m = msg(1, raw.seq, 0, 0, u64::MAX / 2, 0, 0, 0);
            raw.s.write_all(&m).map_err(|e| e.to_string())?;
            Ok("ok".into())
        }
        other => Err(format!("unknown tcp command {other:?}")),
    }
}

fn cmd(raw: &mut Option<Raw>, tcp: &mut Option<RawTcp>, line: &str) -> Result<String, String> {
    let a: Vec<&str> = line.split_whitespace().collect();
    let n = |i: usize| {
        a.get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(format!("arg {i}"))
    };
    if a.first() == Some(&"hello_tcp") {
        *tcp = Some(RawTcp::hello(
            a.get(1).ok_or("addr")?,
            a.get(2).ok_or("from")?,
            a.get(3).ok_or("to")?,
            a.get(4).copied(),
        )?);
        return Ok("ok".into());
    }
    if let Some(t) = tcp.as_mut() {
        return cmd_tcp(t, &a);
    }
    if a.first() == Some(&"hello") {
        *raw = Some(Raw::hello(
            a.get(1).ok_or("path")?,
            a.get(2).ok_or("from")?,
            a.get(3).ok_or("to")?,
            a.get(4).copied(),
        )?);
        return Ok("ok".into());
    }
    let r = raw.as_mut().ok_or("no connection")?;
    match a.first().copied() {
        Some("expose") => {
            let fd = memfd(n(2)?, n(4)? == 1);
            let p = map(fd, n(2)?, libc::PROT_READ | libc::PROT_WRITE);
            if p.cast() == libc::MAP_FAILED {
                return Err("map".into());
            }
            // SAFETY: filling our own fresh mapping of n(2) bytes.
            unsafe { std::ptr::write_bytes(p, n(3)? as u8, n(2)? as usize) };
            let mut c = [0u8; 24];
            c[0] = 1;
            c[8..16].copy_from_slice(&n(1)?.to_le_bytes());
            c[16..24].copy_from_slice(&n(2)?.to_le_bytes());
            if sendmsg(&r.sock, &c, &[fd]) != 24 {
                return Err("sendmsg".into());
            }
            Ok("ok".into())
        }
        Some("write") => {
            r.seq += 1;
            let m = msg(2, r.seq, n(1)? as u32, n(2)?, n(3)?, n(4)?, n(5)?, 0);
            Ok(r.request(m))
        }
        Some("read") => {
            r.seq += 1;
            let m = msg(3, r.seq, n(1)? as u32, n(2)?, n(3)?, 0, 0, 0);
            Ok(r.request(m))
        }
        Some("window_rw") => {
            let fd = r.peer_window_fd;
            let w = map(fd, WINDOW, libc::PROT_READ | libc::PROT_WRITE);
            let mmap_rw = w.cast() != libc::MAP_FAILED;
            let ro = map(fd, WINDOW, libc::PROT_READ);
            // SAFETY: mprotect/pwrite on our own mapping/fd; failure expected.
            let (mp, pw) = unsafe {
                (
                    libc::mprotect(ro.cast(), 4096, libc::PROT_READ | libc::PROT_WRITE),
                    libc::pwrite(fd, b"x".as_ptr().cast(), 1, 0),
                )
            };
            // SAFETY: F_ADD_SEALS/ftruncate attempts on the received fd; failure expected.
            let (unseal, shrink) = unsafe {
                (
                    libc::fcntl(fd, libc::F_ADD_SEALS, 0),
                    libc::ftruncate(fd, 0),
                )
            };
            let ro_ok = ro.cast() != libc::MAP_FAILED;
            Ok(format!("ok mmap_rw={mmap_rw} map_ro={ro_ok} mprotect={mp} pwrite={pw} add_seals={unseal} truncate={shrink}"))
        }
        Some("answer_wrong") => {
            let m = r.pop(Duration::from_secs(5)).ok_or("no request arrived")?;
            let seq = u64::from_le_bytes(m[8..16].try_into().unwrap_or([0; 8]));
            let resp = msg(4, seq + 1000, 0, 0, 0, 0, 0, 0);
            r.push(&resp);
            Ok(format!("ok kind={}", m[0]))
        }
        Some("forge_tail") => {
            put(r.tx, 64, &1_000_000u64.to_ne_bytes());
            let one = 1u64;
            // SAFETY: ringing the peer's eventfd.
            unsafe { libc::write(r.peer_bell, (&one as *const u64).cast(), 8) };
            Ok("ok".into())
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

pub fn main(_args: &[String]) -> i32 {
    let mut raw = None;
    let mut tcp = None;
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "exit" {
            break;
        }
        let r = cmd(&mut raw, &mut tcp, line.trim()).unwrap_or_else(|e| format!("err {e}"));
        let _ = writeln!(out, "{r}");
        let _ = out.flush();
    }
    0
}
