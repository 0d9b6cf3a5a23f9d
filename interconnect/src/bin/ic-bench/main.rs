//! `ic-bench`: side-by-side latency and bandwidth of the interconnect's shm
//! and tcp queue pairs against a Unix domain socket, TCP loopback and
//! iceoryx2, with single-core memcpy as the bandwidth limit. Every peer runs
//! in its own process (this binary re-executed with `serve ...`).
//!
//! `cargo run --release -p interconnect --features bench --bin ic-bench`
mod ice;
mod memcpy;
mod qp;
mod stream;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use interconnect::{DirectoryServer, Transport};

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
        Some("qp") => qp::serve(Path::new(args.get(1).ok_or("dir")?)),
        Some("uds") => {
            let p = PathBuf::from(args.get(1).ok_or("path")?);
            let _ = std::fs::remove_file(&p);
            let l = UnixListener::bind(&p)?;
            ready();
            let (s, _) = l.accept()?;
            let r = stream::serve(s);
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
            stream::serve(s)
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
    let shm = qp::client(&dir_path, Transport::Shm);
    stage("shm QP", t0);
    let t0 = Instant::now();
    let tcpqp = qp::client(&dir_path, Transport::Tcp);
    stage("tcp QP", t0);
    let t0 = Instant::now();
    let uds = stream::client_uds(&dir_path);
    stage("Unix socket", t0);
    let t0 = Instant::now();
    let tcp = stream::client_tcp();
    stage("TCP loopback", t0);
    let t0 = Instant::now();
    let ice = ice::client(&format!("{}", std::process::id()));
    stage("iceoryx2", t0);
    let (mc, mcfd) = match memcpy::bandwidth() {
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
