//! iceoryx2 publish/subscribe as the shared-memory baseline.
use std::time::{Duration, Instant};

use iceoryx2::prelude::*;

use crate::{p50, ready, reap, spawn_server, Res, BW_TOTAL, ITERS, SIZES_BW, SIZES_RTT, WARMUP};

type Pub = iceoryx2::port::publisher::Publisher<ipc::Service, [u8], ()>;
type Sub = iceoryx2::port::subscriber::Subscriber<ipc::Service, [u8], ()>;

struct Ends {
    _node: Node<ipc::Service>,
    tx: Pub,
    rx: Sub,
}

fn ends(tag: &str, me_is_server: bool) -> Res<Ends> {
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

fn send(e: &Ends, data: &[u8]) -> Res<()> {
    let s = e.tx.loan_slice_uninit(data.len())?;
    let s = s.write_from_slice(data);
    s.send()?;
    Ok(())
}

fn recv_len(e: &Ends) -> Res<usize> {
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
