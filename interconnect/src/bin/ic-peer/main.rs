//! `ic-peer`: a process that owns one access layer, one PD, one CQ and one
//! QP and is driven line by line on stdin (answers on stdout). The
//! conformance tests run two of these — possibly in different network
//! namespaces — so that every verb is exercised between separate processes.
//!
//! Usage: `ic-peer <directory-socket> <endpoint-name> <tcp-bind-ip>`
//! `ic-peer hostile-shm <directory-socket> <target>`: see `hostile` below.
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interconnect::*;
use std::result::Result;

mod hostile;

fn access(s: &str) -> Access {
    let mut a = Access::NONE;
    for p in s.split(',') {
        a = a | match p {
            "lw" => Access::LOCAL_WRITE,
            "rw" => Access::REMOTE_WRITE,
            "rr" => Access::REMOTE_READ,
            _ => Access::NONE,
        };
    }
    a
}

/// Order-insensitive within a message, linear in each word: h = Σ word_k·(2k+1).
fn lin_hash(b: &[u8]) -> u64 {
    let (p, len) = (b.as_ptr(), b.len());
    let mut h = 0u64;
    let words = len / 8;
    let mut k = 0usize;
    while k < words {
        // SAFETY: k*8+8 <= len, and the caller passes a readable range.
        let w = unsafe { std::ptr::read_unaligned(p.add(k * 8).cast::<u64>()) };
        h = h.wrapping_add(w.wrapping_mul((2 * k as u64) + 1));
        k += 1;
    }
    h
}

fn combine(t: u64, h: u64) -> u64 {
    t.wrapping_mul(0x100_0000_01b3).wrapping_add(h)
}

fn status(s: WcStatus) -> &'static str {
    match s {
        WcStatus::Success => "ok",
        WcStatus::LocalLength => "loc_len",
        WcStatus::LocalProtection => "loc_prot",
        WcStatus::RemoteAccess => "rem_access",
        WcStatus::RemoteOperation => "rem_op",
        WcStatus::BadResponse => "bad_resp",
        WcStatus::Flushed => "flushed",
    }
}

struct Peer {
    ctx: Context,
    directory: Arc<DirectoryClient>,
    pd: Pd,
    cq: Cq,
    qp: Option<Qp>,
    listener: Option<Listener>,
    mrs: HashMap<String, (Buffer, Mr)>,
    fired: Arc<AtomicU64>,
}

type R = Result<String, String>;

impl Peer {
    fn mr(&self, tag: &str) -> Result<&(Buffer, Mr), String> {
        self.mrs.get(tag).ok_or_else(|| format!("no region {tag}"))
    }

    fn lkey(&self, tag: &str) -> Result<u32, String> {
        match tag.strip_prefix('@') {
            Some(raw) => raw.parse().map_err(|_| "bad raw lkey".to_string()),
            None => Ok(self.mr(tag)?.1.lkey()),
        }
    }

    fn qp(&self) -> Result<&Qp, String> {
        self.qp.as_ref().ok_or_else(|| "qp destroyed".to_string())
    }

    fn poll(&self, want: usize, timeout: Duration) -> Result<Vec<WorkCompletion>, String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < want && Instant::now() < deadline {
            let left = want - out.len();
            self.cq
                .poll_into(&mut out, left)
                .map_err(|e| e.to_string())?;
            if out.len() < want {
                std::thread::yield_now();
            }
        }
        Ok(out)
    }

    fn cmd(&mut self, line: &str) -> R {
        let a: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64, String> {
            a.get(i)
                .ok_or(format!("missing arg {i}"))?
                .parse::<u64>()
                .map_err(|e| format!("arg {i}: {e}"))
        };
        let e = |x: IcError| x.to_string();
        match a.first().copied().unwrap_or("") {
            "listen" => {
                let allow: Vec<&str> = a.get(2).map(|s| s.split(',').collect()).unwrap_or_default();
                self.listener = Some(
                    self.ctx
                        .listen(a.get(1).ok_or("name")?, &allow)
                        .map_err(e)?,
                );
                Ok("ok".into())
            }
            "unregister" => {
                self.directory
                    .unregister(a.get(1).ok_or("name")?)
                    .map_err(e)?;
                Ok("ok".into())
            }
            "accept" => {
                let l = self.listener.as_ref().ok_or("not listening")?;
                let peer = l
                    .accept(self.qp()?, Duration::from_millis(num(1)?))
                    .map_err(e)?;
                Ok(format!("ok {peer}"))
            }
            "connect" => {
                let t = match a.get(2).copied() {
                    Some("shm") => Some(Transport::Shm),
                    Some("tcp") => Some(Transport::Tcp),
                    _ => None,
                };
                self.ctx
                    .connect(
                        self.qp()?,
                        a.get(1).ok_or("name")?,
                        t,
                        Duration::from_secs(5),
                    )
                    .map_err(e)?;
                Ok(format!("ok {:?}", self.qp()?.transport()))
            }
            "reg" => {
                let buf = self.pd.alloc_buffer(num(2)?).map_err(e)?;
                let fill = num(4)? as u8;
                // SAFETY: the buffer is fresh and not registered yet.
                unsafe { buf.as_mut_slice().fill(fill) };
                let mr = self
                    .pd
                    .reg_mr(&buf, 0, num(2)?, access(a.get(3).ok_or("access")?))
                    .map_err(e)?;
                let r = format!("ok {} {}", mr.lkey(), mr.rkey());
                self.mrs.insert(a[1].to_string(), (buf, mr));
                Ok(r)
            }
            "drop" => {
                let (_, mr) = self
                    .mrs
                    .remove(a.get(1).copied().ok_or("tag")?)
                    .ok_or("no region")?;
                let _ = mr.deregister();
                Ok("ok".into())
            }
            "maps" => {
                // mappings of interconnect buffers in this process
                let maps = std::fs::read_to_string("/proc/self/maps").map_err(|x| x.to_string())?;
                Ok(format!(
                    "ok {}",
                    maps.lines().filter(|l| l.contains("memfd:ic-buf-")).count()
                ))
            }
            "dereg" => {
                self.mr(a.get(1).ok_or("tag")?)?.1.deregister().map_err(e)?;
                Ok("ok".into())
            }
            "fill" => {
                let (b, _) = self.mr(a.get(1).ok_or("tag")?)?;
                let v = vec![num(4)? as u8; num(3)? as usize];
                b.write_at(num(2)?, &v).map_err(e)?;
                Ok("ok".into())
            }
            "pattern" => {
                let (b, _) = self.mr(a.get(1).ok_or("tag")?)?;
                let chunk = num(2)?;
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                let first: Vec<u8> = (0..chunk)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let mut off = 0;
                while off + chunk <= b.len() {
                    b.write_at(off, &first).map_err(e)?;
                    off += chunk;
                }
                Ok("ok".into())
            }
            "sum" => {
                let (b, _) = self.mr(a.get(1).ok_or("tag")?)?;
                let (off, len) = (num(2)?, num(3)?);
                let mut v = vec![0u8; len as usize];
                b.read_at(off, &mut v).map_err(e)?;
                let distinct: std::collections::BTreeSet<u8> = v.iter().copied().collect();
                Ok(format!("ok {:x} {:?}", lin_hash(&v), distinct))
            }
            "recv" => {
                let sge = Sge {
                    lkey: self.lkey(a.get(1).ok_or("tag")?)?,
                    offset: num(2)?,
                    len: num(3)?,
                };
                self.qp()?
                    .post_recv(RecvWr {
                        wr_id: num(4)?,
                        sge,
                    })
                    .map_err(e)?;
                Ok("ok".into())
            }
            "post" => {
                let opcode = match a.get(1).copied() {
                    Some("send") => Opcode::Send,
                    Some("send_imm") => Opcode::SendWithImm,
                    Some("write") => Opcode::RdmaWrite,
                    Some("write_imm") => Opcode::RdmaWriteWithImm,
                    Some("read") => Opcode::RdmaRead,
                    _ => return Err("bad opcode".into()),
                };
                let sge = Sge {
                    lkey: self.lkey(a.get(2).ok_or("tag")?)?,
                    offset: num(3)?,
                    len: num(4)?,
                };
                let remote = match opcode {
                    Opcode::Send | Opcode::SendWithImm => None,
                    _ => Some(RemoteAddr {
                        rkey: num(6)? as u32,
                        offset: num(7)?,
                    }),
                };
                let imm = a.get(8).and_then(|s| s.parse::<u32>().ok());
                let signaled = a.get(9).is_none_or(|s| *s != "0");
                self.qp()?
                    .post_send(SendWr {
                        wr_id: num(5)?,
                        opcode,
                        sge,
                        remote,
                        imm,
                        signaled,
                    })
                    .map_err(e)?;
                Ok("ok".into())
            }
            "poll" => {
                let wcs = self.poll(num(1)? as usize, Duration::from_millis(num(2)?))?;
                let items: Vec<String> = wcs
                    .iter()
                    .map(|w| {
                        format!(
                            "{},{},{:?},{},{}",
                            w.wr_id,
                            status(w.status),
                            w.opcode,
                            w.byte_len,
                            w.imm.map_or("-".into(), |i| i.to_string())
                        )
                    })
                    .collect();
                Ok(format!("ok {} {}", wcs.len(), items.join(";")))
            }
            "arm" => {
                self.cq.req_notify();
                Ok("ok".into())
            }
            "fired" => Ok(format!("ok {}", self.fired.load(Ordering::SeqCst))),
            "wait_notify" => Ok(format!(
                "ok {}",
                self.cq.wait_notify(Duration::from_millis(num(1)?))
            )),
            "event" => Ok(
                match self.ctx.get_async_event(Duration::from_millis(num(1)?)) {
                    Some(AsyncEvent::PeerClosed { .. }) => "ok PeerClosed".into(),
                    Some(AsyncEvent::PeerLost { reason, .. }) => format!("ok PeerLost {reason}"),
                    None => "ok none".into(),
                },
            ),
            "stats" => Ok(format!("ok {:?}", self.qp()?.stats())),
            "state" => Ok(format!(
                "ok {}",
                self.qp
                    .as_ref()
                    .map_or("gone".into(), |q| q.state().to_string())
            )),
            "destroy" => {
                self.qp.take();
                Ok("ok".into())
            }
            "close" => {
                self.ctx.close();
                Ok("ok".into())
            }
            "port_reset" => Ok(format!(
                "ok {}",
                self.ctx.port_reset(if a.get(1) == Some(&"tcp") {
                    Transport::Tcp
                } else {
                    Transport::Shm
                })
            )),
            "query" => Ok(format!(
                "ok {:?} {:?} {:?}",
                self.ctx.query(),
                self.ctx.query_ports(),
                self.ctx.query_remote_ports()
            )),
            "sink" => self.sink(a.get(1).ok_or("tag")?, num(2)?, num(3)?),
            "source" => self.source(a.get(1).ok_or("tag")?, num(2)?, num(3)?),
            "echo" => self.echo(a.get(1).ok_or("tag")?, num(2)?, num(3)?),
            "sleep" => {
                std::thread::sleep(Duration::from_millis(num(1)?));
                Ok("ok".into())
            }
            other => Err(format!("unknown command {other:?}")),
        }
    }

    /// Receives `total` bytes as SENDs of `chunk` bytes into 8 rotating
    /// slots of region `tag`, hashing every message in order.
    fn sink(&mut self, tag: &str, chunk: u64, total: u64) -> R {
        let (buf, mr) = self.mr(tag)?.clone();
        let slots = (buf.len() / chunk).min(16);
        if slots == 0 {
            return Err("region smaller than one chunk".into());
        }
        let qp = self.qp()?;
        for s in 0..slots {
            qp.post_recv(RecvWr {
                wr_id: s,
                sge: mr.sge(s * chunk, chunk),
            })
            .map_err(|x| x.to_string())?;
        }
        let start = Instant::now();
        let (mut got, mut t) = (0u64, 0u64);
        let mut wcs = Vec::new();
        while got < total {
            wcs.clear();
            self.cq.poll_into(&mut wcs, 16).map_err(|x| x.to_string())?;
            if wcs.is_empty() {
                if start.elapsed() > Duration::from_secs(120) {
                    return Err(format!("sink timed out after {got} bytes"));
                }
                std::hint::spin_loop();
                continue;
            }
            for w in &wcs {
                if w.status != WcStatus::Success {
                    return Err(format!("sink completion {}: {}", w.wr_id, w.status));
                }
                let off = (w.wr_id * chunk) as usize;
                // SAFETY: the slot's receive completed; nothing writes it until reposted.
                let slot = unsafe { &buf.as_slice()[off..off + w.byte_len as usize] };
                t = combine(t, lin_hash(slot));
                got += w.byte_len;
                if got + (slots - 1) * chunk < total + chunk * slots {
                    qp.post_recv(RecvWr {
                        wr_id: w.wr_id,
                        sge: mr.sge(w.wr_id * chunk, chunk),
                    })
                    .map_err(|x| x.to_string())?;
                }
            }
        }
        Ok(format!(
            "ok {t:x} {got} {:.3}",
            start.elapsed().as_secs_f64()
        ))
    }

    /// Sends `total` bytes as SENDs of `chunk` bytes from 4 rotating slots of
    /// region `tag`; message i has its first word set to i. The hash is
    /// computed from the linear hash of the base slot content.
    fn source(&mut self, tag: &str, chunk: u64, total: u64) -> R {
        let (buf, mr) = self.mr(tag)?.clone();
        let slots = (buf.len() / chunk).min(4);
        if slots == 0 || chunk < 8 {
            return Err("region smaller than one chunk".into());
        }
        // SAFETY: region is idle: nothing is posted on it yet.
        let base = lin_hash(unsafe { &buf.as_slice()[..chunk as usize] });
        let mut first = [0u8; 8];
        buf.read_at(0, &mut first).map_err(|x| x.to_string())?;
        let w0 = u64::from_ne_bytes(first);
        let qp = self.qp()?;
        let n = total.div_ceil(chunk);
        let start = Instant::now();
        let (mut posted, mut done, mut t) = (0u64, 0u64, 0u64);
        let mut wcs = Vec::new();
        while done < n {
            while posted < n && posted - done < slots {
                let s = posted % slots;
                buf.write_at(s * chunk, &posted.to_ne_bytes())
                    .map_err(|x| x.to_string())?;
                let h = base.wrapping_sub(w0).wrapping_add(posted);
                t = combine(t, h);
                qp.post_send(SendWr {
                    wr_id: posted,
                    opcode: Opcode::Send,
                    sge: mr.sge(s * chunk, chunk),
                    remote: None,
                    imm: None,
                    signaled: true,
                })
                .map_err(|x| x.to_string())?;
                posted += 1;
            }
            wcs.clear();
            self.cq.poll_into(&mut wcs, 16).map_err(|x| x.to_string())?;
            for w in &wcs {
                if w.status != WcStatus::Success {
                    return Err(format!("source completion {}: {}", w.wr_id, w.status));
                }
                done += 1;
            }
            if wcs.is_empty() {
                if start.elapsed() > Duration::from_secs(120) {
                    return Err("source timed out".into());
                }
                std::hint::spin_loop();
            }
        }
        Ok(format!(
            "ok {t:x} {} {:.3}",
            n * chunk,
            start.elapsed().as_secs_f64()
        ))
    }

    /// Answers `count` SENDs of `len` bytes with a SEND of the same size.
    fn echo(&mut self, tag: &str, len: u64, count: u64) -> R {
        let (_buf, mr) = self.mr(tag)?.clone();
        let qp = self.qp()?;
        qp.post_recv(RecvWr {
            wr_id: 0,
            sge: mr.sge(0, len.max(1)),
        })
        .map_err(|x| x.to_string())?;
        let mut wcs = Vec::new();
        let mut seen = 0;
        let start = Instant::now();
        while seen < count {
            wcs.clear();
            self.cq.poll_into(&mut wcs, 4).map_err(|x| x.to_string())?;
            for w in &wcs {
                if w.opcode == WcOpcode::Recv {
                    seen += 1;
                    if seen < count {
                        qp.post_recv(RecvWr {
                            wr_id: 0,
                            sge: mr.sge(0, len.max(1)),
                        })
                        .map_err(|x| x.to_string())?;
                    }
                    qp.post_send(SendWr {
                        wr_id: 1,
                        opcode: Opcode::Send,
                        sge: mr.sge(len.max(1), len),
                        remote: None,
                        imm: None,
                        signaled: false,
                    })
                    .map_err(|x| x.to_string())?;
                }
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err("echo timed out".into());
            }
        }
        Ok("ok".into())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("hostile-shm") {
        std::process::exit(hostile::main(&args[2..]));
    }
    if args.len() < 4 {
        eprintln!("usage: ic-peer <directory-socket> <endpoint-name> <tcp-bind-ip> | ic-peer hostile-shm <directory-socket> <target> <ro-rkey> <rw-rkey> <dead-rkey>");
        std::process::exit(2);
    }
    let dir = Arc::new(DirectoryClient::new(std::path::Path::new(&args[1])));
    let opts = ContextOptions {
        tcp_bind: args[3]
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        ..Default::default()
    };
    let setup = || -> interconnect::Result<Peer> {
        let ctx = Context::open(&args[2], dir.clone(), opts)?;
        let pd = ctx.alloc_pd()?;
        let cq = ctx.create_cq(4096)?;
        let fired = Arc::new(AtomicU64::new(0));
        let f2 = fired.clone();
        cq.set_callback(move || {
            f2.fetch_add(1, Ordering::SeqCst);
        });
        let qp = ctx.create_qp(
            &pd,
            &cq,
            &cq,
            QpCaps {
                max_send_wr: 64,
                max_recv_wr: 256,
            },
        )?;
        Ok(Peer {
            ctx,
            directory: dir.clone(),
            pd,
            cq,
            qp: Some(qp),
            listener: None,
            mrs: HashMap::new(),
            fired,
        })
    };
    let mut peer = match setup() {
        Ok(p) => p,
        Err(e) => {
            println!("err setup: {e}");
            std::process::exit(1);
        }
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "exit" {
            break;
        }
        let r = match peer.cmd(line.trim()) {
            Ok(s) => s,
            Err(s) => format!("err {s}"),
        };
        let _ = writeln!(out, "{r}");
        let _ = out.flush();
    }
}
