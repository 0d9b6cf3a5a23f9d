//! Byte-stream baselines: a Unix domain socket and TCP loopback, each with
//! the same echo/sink protocol as the queue pairs.
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{p50, reap, spawn_server, Res, BW_TOTAL, ITERS, SIZES_BW, SIZES_RTT, WARMUP};
pub fn serve<S: Read + Write>(mut s: S) -> Res<()> {
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

fn client<S: Read + Write>(mut s: S) -> Res<(Vec<Duration>, Vec<f64>)> {
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

pub fn client_uds(dir: &Path) -> Res<(Vec<Duration>, Vec<f64>)> {
    let path = dir.with_extension("uds");
    let (child, _o) = spawn_server(&["uds", path.to_str().ok_or("path")?])?;
    let r = client(UnixStream::connect(&path)?);
    reap(child);
    r
}

pub fn client_tcp() -> Res<(Vec<Duration>, Vec<f64>)> {
    let (child, mut o) = spawn_server(&["tcp"])?;
    let mut port = String::new();
    o.read_line(&mut port)?;
    let s = TcpStream::connect(("127.0.0.1", port.trim().parse::<u16>()?))?;
    s.set_nodelay(true)?;
    let r = client(s);
    reap(child);
    r
}
