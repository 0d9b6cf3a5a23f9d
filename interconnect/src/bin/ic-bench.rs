//! `ic-bench`: side-by-side latency and bandwidth of the interconnect's shm
//! and tcp queue pairs against a Unix domain socket, TCP loopback and
//! iceoryx2, with single-core memcpy as the bandwidth limit. Every peer runs
//! in its own process (this binary re-executed with `serve ...`).
//!
//! `cargo run --release -p interconnect --features bench --bin ic-bench`
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interconnect::*;

const SIZES_RTT: [usize; 3] = [8, 64, 4096];
const SIZES_BW: [usize; 2] = [64 << 10, 1 << 20];
const ITERS: usize = 10_000;
const WARMUP: usize = 1_000;
const BW_TOTAL: u64 = 512 << 20;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn spawn_server(args: &[&str]) -> Res<(Child, BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        return Err(format!("server {args:?} said {line:?}").into());
    }
    Ok((child, out))
}

fn ready() {
    println!("ready");
    let _ = std::io::stdout().flush();
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

// ----------------------------------------------------------------- QPs

struct QpEnd {
    _ctx: Context,
    cq: Cq,
    qp: Qp,
    mr: Mr,
}

fn qp_end(name: &str, dir: &Path) -> Res<(Context, Pd, Cq, Qp)> {
    let ctx = Context::open(
        name,
        Arc::new(DirectoryClient::new(dir)),
        ContextOptions::default(),
    )?;
    let pd = ctx.alloc_pd()?;
    let cq = ctx.create_cq(1024)?;
    let qp = ctx.create_qp(
        &pd,
        &cq,
        &cq,
        QpCaps {
            max_send_wr: 64,
            max_recv_wr: 64,
        },
    )?;
    Ok((ctx, pd, cq, qp))
}

fn finish_end(ctx: Context, pd: Pd, cq: Cq, qp: Qp) -> Res<QpEnd> {
    let len = 32u64 << 20;
    let buf = pd.alloc_buffer(len)?;
    let mr = pd.reg_mr(&buf, 0, len, Access::LOCAL_WRITE)?;
    Ok(QpEnd {
        _ctx: ctx,
        cq,
        qp,
        mr,
    })
}

const RECV_BASE: u64 = 16 << 20; // [0,16M) send slots, [16M,32M) receive slots
/// Sends in flight (and source slots): deep enough that the sender can run
/// ahead while the receiver is descheduled on a shared machine.
const SEND_SLOTS: usize = 16;

/// Receive slots for a message size: the same working set memcpy is given.
fn recv_slots(size: usize) -> u64 {
    ((16 << 20) / size).clamp(4, 16) as u64
}

fn wait_recv(e: &QpEnd, wcs: &mut Vec<WorkCompletion>) -> Res<WorkCompletion> {
    loop {
        wcs.clear();
        // one at a time: a completion left in `wcs` would be lost
        e.cq.poll_into(wcs, 1)?;
        for w in wcs.iter() {
            if w.status != WcStatus::Success {
                return Err(format!("completion error: {}", w.status).into());
            }
            if w.opcode == WcOpcode::Recv {
                return Ok(*w);
            }
        }
    }
}

fn send(e: &QpEnd, off: u64, len: usize, signaled: bool, wr_id: u64) -> Res<()> {
    e.qp.post_send(SendWr {
        wr_id,
        opcode: Opcode::Send,
        sge: e.mr.sge(off, len as u64),
        remote: None,
        imm: None,
        signaled,
    })?;
    Ok(())
}

fn recv(e: &QpEnd, slot: u64, len: usize) -> Res<()> {
    e.qp.post_recv(RecvWr {
        wr_id: slot,
        sge: e.mr.sge(RECV_BASE + slot * len as u64, len as u64),
    })?;
    Ok(())
}

fn serve_qp(dir: &Path) -> Res<()> {
    let (ctx, pd, cq, qp) = qp_end("bench-srv", dir)?;
    let l = ctx.listen("bench", &["bench-cli"])?;
    ready();
    l.accept(&qp, Duration::from_secs(30))?;
    let e = finish_end(ctx, pd, cq, qp)?;
    let mut wcs = Vec::new();
    for &s in &SIZES_RTT {
        for _ in 0..WARMUP + ITERS {
            recv(&e, 0, s)?;
            wait_recv(&e, &mut wcs)?;
            send(&e, 0, s, false, 0)?;
        }
    }
    for &s in &SIZES_BW {
        let slots = recv_slots(s);
        for i in 0..slots {
            recv(&e, i, s)?;
        }
        let n = BW_TOTAL / s as u64;
        for k in 0..n {
            let w = wait_recv(&e, &mut wcs)?;
            if k + slots < n {
                recv(&e, w.wr_id, s)?;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn client_qp(dir: &Path, t: Transport) -> Res<(Vec<Duration>, Vec<f64>)> {
    let (child, _out) = spawn_server(&["qp", dir.to_str().ok_or("path")?])?;
    let (ctx, pd, cq, qp) = qp_end("bench-cli", dir)?;
    ctx.connect(&qp, "bench", Some(t), Duration::from_secs(10))?;
    let e = finish_end(ctx, pd, cq, qp)?;
    let mut wcs = Vec::new();
    let mut rtts = Vec::new();
    for &s in &SIZES_RTT {
        let mut v = Vec::with_capacity(ITERS);
        for i in 0..WARMUP + ITERS {
            let t0 = Instant::now();
            recv(&e, 0, s)?;
            send(&e, 0, s, false, 0)?;
            wait_recv(&e, &mut wcs)?;
            if i >= WARMUP {
                v.push(t0.elapsed());
            }
        }
        rtts.push(p50(v));
    }
    let mut bws = Vec::new();
    for &s in &SIZES_BW {
        let slots = SEND_SLOTS as u64;
        let n = BW_TOTAL / s as u64;
        let t0 = Instant::now();
        let (mut posted, mut done) = (0u64, 0u64);
        while done < n {
            while posted < n && posted - done < slots {
                send(&e, (posted % slots) * s as u64, s, true, posted)?;
                posted += 1;
            }
            wcs.clear();
            e.cq.poll_into(&mut wcs, 16)?;
            for w in &wcs {
                if w.status != WcStatus::Success {
                    return Err(format!("bw completion: {}", w.status).into());
                }
                done += 1;
            }
        }
        bws.push(BW_TOTAL as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    reap(child);
    Ok((rtts, bws))
}

fn reap(mut c: Child) {
    for _ in 0..200 {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    let _ = c.wait();
}

// ----------------------------------------------------- byte streams

fn serve_stream<S: Read + Write>(mut s: S) -> Res<()> {
    let mut buf = vec![0u8; 1 << 20];
    for &sz in &SIZES_RTT {
        for _ in 0..WARMUP + ITERS {
            s.read_exact(&mut buf[..sz])?;
            s.write_all(&buf[..sz])?;
        }
    }
    for &sz in &SIZES_BW {
        for _ in 0..BW_TOTAL / sz as u64 {
            s.read_exact(&mut buf[..sz])?;
        }
        s.write_all(&[1])?;
    }
    Ok(())
}

fn client_stream<S: Read + Write>(mut s: S) -> Res<(Vec<Duration>, Vec<f64>)> {
    let mut buf = vec![7u8; 1 << 20];
    let mut rtts = Vec::new();
    for &sz in &SIZES_RTT {
        let mut v = Vec::with_capacity(ITERS);
        for i in 0..WARMUP + ITERS {
            let t0 = Instant::now();
            s.write_all(&buf[..sz])?;
            s.read_exact(&mut buf[..sz])?;
            if i >= WARMUP {
                v.push(t0.elapsed());
            }
        }
        rtts.push(p50(v));
    }
    let mut bws = Vec::new();
    for &sz in &SIZES_BW {
        let t0 = Instant::now();
        for _ in 0..BW_TOTAL / sz as u64 {
            s.write_all(&buf[..sz])?;
        }
        s.read_exact(&mut buf[..1])?;
        bws.push(BW_TOTAL as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    Ok((rtts, bws))
}

fn client_uds(dir: &Path) -> Res<(Vec<Duration>, Vec<f64>)> {
    let path = dir.with_extension("uds");
    let (child, _o) = spawn_server(&["uds", path.to_str().ok_or("path")?])?;
    let r = client_stream(UnixStream::connect(&path)?);
    reap(child);
    r
}

fn client_tcp() -> Res<(Vec<Duration>, Vec<f64>)> {
    let (child, mut o) = spawn_server(&["tcp"])?;
    let mut port = String::new();
    o.read_line(&mut port)?;
    let s = TcpStream::connect(("127.0.0.1", port.trim().parse::<u16>()?))?;
    s.set_nodelay(true)?;
    let r = client_stream(s);
    reap(child);
    r
}

// ----------------------------------------------------------- iceoryx2

mod ice {
    use super::*;
    use iceoryx2::prelude::*;

    type Pub = iceoryx2::port::publisher::Publisher<ipc::Service, [u8], ()>;
    type Sub = iceoryx2::port::subscriber::Subscriber<ipc::Service, [u8], ()>;

    pub struct Ends {
        _node: Node<ipc::Service>,
        pub tx: Pub,
        pub rx: Sub,
    }

    pub fn ends(tag: &str, me_is_server: bool) -> Res<Ends> {
        let node = NodeBuilder::new().create::<ipc::Service>()?;
        let mk = |name: String| -> Res<_> {
            Ok(node
                .service_builder(&name.as_str().try_into()?)
                .publish_subscribe::<[u8]>()
                .enable_safe_overflow(false)
                .subscriber_max_buffer_size(16)
                .history_size(0)
                .open_or_create()?)
        };
        let ping = mk(format!("icbench/{tag}/ping"))?;
        let pong = mk(format!("icbench/{tag}/pong"))?;
        let (out_svc, in_svc) = if me_is_server {
            (&pong, &ping)
        } else {
            (&ping, &pong)
        };
        let tx = out_svc
            .publisher_builder()
            .initial_max_slice_len(1 << 20)
            .max_loaned_samples(4)
            .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
            .create()?;
        let rx = in_svc.subscriber_builder().create()?;
        Ok(Ends {
            _node: node,
            tx,
            rx,
        })
    }

    pub fn send(e: &Ends, data: &[u8]) -> Res<()> {
        let s = e.tx.loan_slice_uninit(data.len())?;
        let s = s.write_from_slice(data);
        s.send()?;
        Ok(())
    }

    pub fn recv_len(e: &Ends) -> Res<usize> {
        loop {
            if let Some(s) = e.rx.receive()? {
                return Ok(s.payload().len());
            }
            std::hint::spin_loop();
        }
    }

    pub fn serve(tag: &str) -> Res<()> {
        let e = ends(tag, true)?;
        ready();
        let buf = vec![3u8; 1 << 20];
        // wait for the client's subscriber, then answer pings
        for &sz in &SIZES_RTT {
            for _ in 0..WARMUP + ITERS {
                loop {
                    if let Some(s) = e.rx.receive()? {
                        let out = e.tx.loan_slice_uninit(s.payload().len())?;
                        out.write_from_slice(s.payload()).send()?;
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            let _ = sz;
        }
        for &sz in &SIZES_BW {
            let mut got = 0u64;
            while got < BW_TOTAL {
                got += recv_len(&e)? as u64;
            }
            send(&e, &buf[..1])?;
            let _ = sz;
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    }

    pub fn client(tag: &str) -> Res<(Vec<Duration>, Vec<f64>)> {
        let (child, _o) = spawn_server(&["ice", tag])?;
        let e = ends(tag, false)?;
        // the server's publisher must see our subscriber before we ping
        std::thread::sleep(Duration::from_millis(300));
        let buf = vec![5u8; 1 << 20];
        let mut rtts = Vec::new();
        for &sz in &SIZES_RTT {
            let mut v = Vec::with_capacity(ITERS);
            for i in 0..WARMUP + ITERS {
                let t0 = Instant::now();
                send(&e, &buf[..sz])?;
                recv_len(&e)?;
                if i >= WARMUP {
                    v.push(t0.elapsed());
                }
            }
            rtts.push(p50(v));
        }
        let mut bws = Vec::new();
        for &sz in &SIZES_BW {
            let t0 = Instant::now();
            for _ in 0..BW_TOTAL / sz as u64 {
                send(&e, &buf[..sz])?;
            }
            recv_len(&e)?;
            bws.push(BW_TOTAL as f64 / t0.elapsed().as_secs_f64() / 1e9);
        }
        reap(child);
        Ok((rtts, bws))
    }
}

// ------------------------------------------------------------- memcpy

/// Single-core memcpy over the same working set as the QP bandwidth runs
/// (`SEND_SLOTS` source slots, `recv_slots` destination slots): once between ordinary
/// heap buffers (which may get transparent huge pages), once between two
/// buffers from the interconnect allocator (memfds, 4 KiB pages here).
fn memcpy_bw() -> Res<(Vec<f64>, Vec<f64>)> {
    let run = |src: *const u8, dst: *mut u8, sz: usize| {
        let n = BW_TOTAL as usize / sz;
        let ds = recv_slots(sz) as usize;
        let t0 = Instant::now();
        for i in 0..n {
            let (a, b) = ((i % SEND_SLOTS) * sz, (i % ds) * sz);
            // SAFETY: both ranges lie inside buffers of at least
            // SEND_SLOTS*sz and recv_slots*sz bytes, which do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.add(a), dst.add(b), sz) };
        }
        std::hint::black_box(dst);
        BW_TOTAL as f64 / t0.elapsed().as_secs_f64() / 1e9
    };
    let src = vec![1u8; 16 << 20];
    let mut dst = vec![0u8; 16 << 20];
    let heap = SIZES_BW
        .iter()
        .map(|&sz| run(src.as_ptr(), dst.as_mut_ptr(), sz))
        .collect();
    let ctx = Context::open(
        "bench-memcpy",
        Arc::new(MemDirectory::default()),
        ContextOptions::default(),
    )?;
    let pd = ctx.alloc_pd()?;
    let (a, b) = (pd.alloc_buffer(16 << 20)?, pd.alloc_buffer(16 << 20)?);
    a.write_at(0, &src)?;
    let memfd = SIZES_BW
        .iter()
        .map(|&sz| run(a.as_ptr(), b.as_ptr(), sz))
        .collect();
    Ok((heap, memfd))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn serve(args: &[String]) -> Res<()> {
    match args.first().map(String::as_str) {
        Some("qp") => serve_qp(Path::new(args.get(1).ok_or("dir")?)),
        Some("uds") => {
            let p = PathBuf::from(args.get(1).ok_or("path")?);
            let _ = std::fs::remove_file(&p);
            let l = UnixListener::bind(&p)?;
            ready();
            let (s, _) = l.accept()?;
            let r = serve_stream(s);
            let _ = std::fs::remove_file(&p);
            r
        }
        Some("tcp") => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            ready();
            println!("{}", l.local_addr()?.port());
            std::io::stdout().flush()?;
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            serve_stream(s)
        }
        Some("ice") => ice::serve(args.get(1).ok_or("tag")?),
        _ => Err("unknown server".into()),
    }
}

fn row(name: &str, r: &Res<(Vec<Duration>, Vec<f64>)>) -> String {
    match r {
        Ok((rtt, bw)) => format!(
            "{name:<14} {:>9.2} {:>9.2} {:>9.2}   {:>9.2} {:>9.2}",
            rtt[0].as_secs_f64() * 1e6,
            rtt[1].as_secs_f64() * 1e6,
            rtt[2].as_secs_f64() * 1e6,
            bw[0],
            bw[1]
        ),
        Err(e) => format!("{name:<14} failed: {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        if let Err(e) = serve(&args[2..]) {
            eprintln!("server failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let load0 = loadavg();
    let dir_path = std::env::temp_dir().join(format!("ic-bench-{}.sock", std::process::id()));
    let _dir = match DirectoryServer::serve(&dir_path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("directory: {e}");
            std::process::exit(1);
        }
    };
    let stage = |name: &str, t0: Instant| {
        eprintln!(
            "ic-bench: {name} done in {:.1} s",
            t0.elapsed().as_secs_f64()
        )
    };
    let t0 = Instant::now();
    let shm = client_qp(&dir_path, Transport::Shm);
    stage("shm QP", t0);
    let t0 = Instant::now();
    let tcpqp = client_qp(&dir_path, Transport::Tcp);
    stage("tcp QP", t0);
    let t0 = Instant::now();
    let uds = client_uds(&dir_path);
    stage("Unix socket", t0);
    let t0 = Instant::now();
    let tcp = client_tcp();
    stage("TCP loopback", t0);
    let t0 = Instant::now();
    let ice = ice::client(&format!("{}", std::process::id()));
    stage("iceoryx2", t0);
    let (mc, mcfd) = match memcpy_bw() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("memcpy: {e}");
            std::process::exit(1);
        }
    };
    println!("ic-bench: {ITERS} round trips per size (p50), {} MiB per bandwidth point; load before {load0}, after {}", BW_TOTAL >> 20, loadavg());
    println!(
        "{:<14} {:>9} {:>9} {:>9}   {:>9} {:>9}",
        "", "RTT 8B", "RTT 64B", "RTT 4KiB", "BW 64KiB", "BW 1MiB"
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9}   {:>9} {:>9}",
        "", "us", "us", "us", "GB/s", "GB/s"
    );
    for (n, r) in [
        ("shm QP", &shm),
        ("tcp QP", &tcpqp),
        ("Unix socket", &uds),
        ("TCP loopback", &tcp),
        ("iceoryx2", &ice),
    ] {
        println!("{}", row(n, r));
    }
    println!(
        "{:<14} {:>9} {:>9} {:>9}   {:>9.2} {:>9.2}",
        "memcpy heap", "", "", "", mc[0], mc[1]
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9}   {:>9.2} {:>9.2}",
        "memcpy memfd", "", "", "", mcfd[0], mcfd[1]
    );
    if let Ok((srtt, sbw)) = &shm {
        let ratio = |r: &Res<(Vec<Duration>, Vec<f64>)>, i: usize| {
            r.as_ref()
                .map(|(x, _)| format!("{:.3}", srtt[i].as_secs_f64() / x[i].as_secs_f64()))
                .unwrap_or("n/a".into())
        };
        println!(
            "shm 64 B RTT / TCP loopback = {}   (target <= 0.02)",
            ratio(&tcp, 1)
        );
        println!("shm 64 B RTT / Unix socket  = {}", ratio(&uds, 1));
        println!(
            "shm 64 B RTT / iceoryx2     = {}   (target <= 1.5)",
            ratio(&ice, 1)
        );
        println!(
            "shm 64 B RTT                = {:.2} us (target <= 1 us)",
            srtt[1].as_secs_f64() * 1e6
        );
        println!(
            "shm 1 MiB BW / memcpy heap  = {:.3}   (target >= 0.7)",
            sbw[1] / mc[1]
        );
        println!("shm 1 MiB BW / memcpy memfd = {:.3}", sbw[1] / mcfd[1]);
        println!("shm 64 KiB BW / memcpy heap = {:.3}", sbw[0] / mc[0]);
        for (n, r) in [
            ("Unix socket", &uds),
            ("TCP loopback", &tcp),
            ("iceoryx2", &ice),
        ] {
            if let Ok((_, bw)) = r {
                println!("shm 1 MiB BW / {n:<12} = {:.2}", sbw[1] / bw[1]);
            }
        }
    }
}
