//! The interconnect's own queue pairs (shm or tcp transport): a served
//! end that echoes and sinks, and the measuring client.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use interconnect::*;

use crate::{p50, ready, reap, spawn_server, Res, BW_TOTAL, ITERS, SIZES_BW, SIZES_RTT, WARMUP};
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
pub const SEND_SLOTS: usize = 16;

/// Receive slots for a message size: the same working set memcpy is given.
pub fn recv_slots(size: usize) -> u64 {
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

pub fn serve(dir: &Path) -> Res<()> {
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

pub fn client(dir: &Path, t: Transport) -> Res<(Vec<Duration>, Vec<f64>)> {
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
