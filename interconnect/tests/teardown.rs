//! Transport-independent rules of the verbs objects, in one process.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;

use interconnect::*;

fn ctx(name: &str) -> Context {
    Context::open(
        name,
        Arc::new(MemDirectory::default()),
        ContextOptions::default(),
    )
    .unwrap()
}

#[test]
fn pd_with_live_mrs_or_qps_and_cq_with_qps_are_busy() {
    let c = ctx("a");
    let pd = c.alloc_pd().unwrap();
    let cq = c.create_cq(16).unwrap();
    let buf = pd.alloc_buffer(8192).unwrap();
    let mr = pd.reg_mr(&buf, 0, 8192, Access::LOCAL_WRITE).unwrap();
    let qp = c.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
    assert!(matches!(pd.dealloc(), Err(IcError::Busy { .. })));
    mr.deregister().unwrap();
    assert!(
        matches!(mr.deregister(), Err(IcError::InvalidArgument(_))),
        "double deregistration"
    );
    match pd.dealloc() {
        Err(IcError::Busy { detail, .. }) => {
            assert_eq!(detail, "0 memory regions and 1 queue pairs")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(cq.destroy(), Err(IcError::Busy { .. })));
    assert_eq!(c.query().qps, 1);
    drop(qp);
    assert_eq!(c.query().qps, 0);
    cq.destroy().unwrap();
    pd.dealloc().unwrap();
    let q = c.query();
    assert_eq!((q.pds, q.cqs), (0, 0));
    assert!(
        pd.alloc_buffer(10).is_err(),
        "deallocated PD refuses new buffers"
    );
}

#[test]
fn destroying_a_qp_flushes_its_receives_and_unconnected_sends_are_refused() {
    let c = ctx("a");
    let pd = c.alloc_pd().unwrap();
    let cq = c.create_cq(16).unwrap();
    let buf = pd.alloc_buffer(4096).unwrap();
    let mr = pd.reg_mr(&buf, 0, 4096, Access::LOCAL_WRITE).unwrap();
    let qp = c
        .create_qp(
            &pd,
            &cq,
            &cq,
            QpCaps {
                max_send_wr: 4,
                max_recv_wr: 2,
            },
        )
        .unwrap();
    qp.post_recv(RecvWr {
        wr_id: 1,
        sge: mr.sge(0, 64),
    })
    .unwrap();
    qp.post_recv(RecvWr {
        wr_id: 2,
        sge: mr.sge(64, 64),
    })
    .unwrap();
    assert!(matches!(
        qp.post_recv(RecvWr {
            wr_id: 3,
            sge: mr.sge(0, 64)
        }),
        Err(IcError::QueueFull(_))
    ));
    let wr = SendWr {
        wr_id: 9,
        opcode: Opcode::Send,
        sge: mr.sge(0, 8),
        remote: None,
        imm: None,
        signaled: true,
    };
    assert!(matches!(
        qp.post_send(wr),
        Err(IcError::InvalidState { .. })
    ));
    let rdma_without_remote = SendWr {
        opcode: Opcode::RdmaWrite,
        ..wr
    };
    assert!(matches!(
        qp.post_send(rdma_without_remote),
        Err(IcError::InvalidArgument(_))
    ));
    qp.destroy();
    let wcs = cq.poll(10).unwrap();
    let got: Vec<(u64, WcStatus)> = wcs.iter().map(|w| (w.wr_id, w.status)).collect();
    assert_eq!(got, [(1, WcStatus::Flushed), (2, WcStatus::Flushed)]);
}

#[test]
fn memory_regions_must_lie_inside_their_buffer_and_get_distinct_keys() {
    let c = ctx("a");
    let pd = c.alloc_pd().unwrap();
    let buf = pd.alloc_buffer(4096).unwrap();
    assert!(pd.reg_mr(&buf, 4000, 200, Access::LOCAL_WRITE).is_err());
    assert!(pd.reg_mr(&buf, 0, 0, Access::LOCAL_WRITE).is_err());
    let a = pd.reg_mr(&buf, 0, 4096, Access::REMOTE_READ).unwrap();
    let b = pd.reg_mr(&buf, 0, 4096, Access::REMOTE_READ).unwrap();
    let keys = [a.lkey(), a.rkey(), b.lkey(), b.rkey()];
    for i in 0..4 {
        for j in i + 1..4 {
            assert_ne!(keys[i], keys[j]);
        }
    }
}

#[test]
fn query_reports_ports_and_allowed_remote_ports() {
    let c = ctx("server");
    let _l = c.listen("svc", &["alice", "bob"]).unwrap();
    let ports = c.query_ports();
    assert_eq!(
        ports.iter().map(|p| p.transport).collect::<Vec<_>>(),
        [Transport::Shm, Transport::Tcp]
    );
    let remote: Vec<String> = c.query_remote_ports().into_iter().map(|r| r.name).collect();
    assert_eq!(remote, ["alice", "bob"]);
    let attr = c.query();
    assert_eq!(attr.name, "server");
    assert_eq!(attr.max_read, MAX_READ);
}

#[test]
fn status_strings_tell_the_user_what_happened() {
    assert!(WcStatus::RemoteAccess.to_string().contains("rkey"));
    assert!(WcStatus::LocalLength.to_string().contains("too small"));
    assert!(WcStatus::Flushed.to_string().contains("destroyed"));
}

#[test]
fn standalone_directory_binary_serves_lookups_with_allowlist() {
    use std::io::BufRead;
    let path = std::env::temp_dir().join(format!("ic-dir-bin-{}.sock", std::process::id()));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ic-directory"))
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ic-directory: serving"), "{line}");
    let server = ctx_with("server", &path);
    let _l = server.listen("svc", &["alice"]).unwrap();
    let dir = DirectoryClient::new(&path);
    assert_eq!(dir.resolve("alice", "svc").unwrap().endpoint.name, "svc");
    assert!(matches!(
        dir.resolve("mallory", "svc"),
        Err(IcError::Refused(_))
    ));
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_file(&path);
}

fn ctx_with(name: &str, dir: &std::path::Path) -> Context {
    Context::open(
        name,
        Arc::new(DirectoryClient::new(dir)),
        ContextOptions::default(),
    )
    .unwrap()
}

#[test]
fn completion_queue_overflow_is_reported_not_silently_dropped() {
    let c = ctx("a");
    let pd = c.alloc_pd().unwrap();
    let cq = c.create_cq(1).unwrap();
    let buf = pd.alloc_buffer(4096).unwrap();
    let mr = pd.reg_mr(&buf, 0, 4096, Access::LOCAL_WRITE).unwrap();
    let qp = c.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
    qp.post_recv(RecvWr {
        wr_id: 1,
        sge: mr.sge(0, 64),
    })
    .unwrap();
    qp.post_recv(RecvWr {
        wr_id: 2,
        sge: mr.sge(64, 64),
    })
    .unwrap();
    drop(qp); // two flushed completions into a CQ of depth 1
    assert!(matches!(cq.poll(4), Err(IcError::CqOverflow)));
}

#[test]
fn completion_callback_may_poll_rearm_and_post_without_deadlock() {
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};
    let dir: Arc<dyn Directory> = Arc::new(MemDirectory::default());
    let srv = Context::open("srv", dir.clone(), ContextOptions::default()).unwrap();
    let cli = Context::open("cli", dir, ContextOptions::default()).unwrap();
    let (spd, scq) = (srv.alloc_pd().unwrap(), srv.create_cq(64).unwrap());
    let sqp = Arc::new(srv.create_qp(&spd, &scq, &scq, QpCaps::default()).unwrap());
    let sbuf = spd.alloc_buffer(4096).unwrap();
    let smr = spd.reg_mr(&sbuf, 0, 4096, Access::LOCAL_WRITE).unwrap();
    sqp.post_recv(RecvWr {
        wr_id: 0,
        sge: smr.sge(0, 64),
    })
    .unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let slot: Arc<OnceLock<Arc<Qp>>> = Arc::new(OnceLock::new());
    let _ = slot.set(sqp.clone());
    let (cq2, got2, slot2, mr2) = (scq.clone(), got.clone(), slot.clone(), smr.clone());
    scq.set_callback(move || {
        // A typical handler: drain the CQ, repost the receive, re-arm.
        for wc in cq2.poll(16).unwrap() {
            if wc.status != WcStatus::Success {
                continue; // flushed at teardown: do not repost
            }
            got2.lock().unwrap().push(wc.wr_id);
            let qp = slot2.get().unwrap();
            qp.post_recv(RecvWr {
                wr_id: wc.wr_id + 1,
                sge: mr2.sge(0, 64),
            })
            .unwrap();
        }
        cq2.req_notify();
    });
    scq.req_notify();
    let listener = srv.listen("svc", &["cli"]).unwrap();
    let sqp2 = sqp.clone();
    let acceptor = std::thread::spawn(move || {
        listener
            .accept(&sqp2, Duration::from_secs(10))
            .map(|_| listener)
    });
    let (cpd, ccq) = (cli.alloc_pd().unwrap(), cli.create_cq(64).unwrap());
    let cqp = cli.create_qp(&cpd, &ccq, &ccq, QpCaps::default()).unwrap();
    cli.connect(&cqp, "svc", Some(Transport::Shm), Duration::from_secs(10))
        .unwrap();
    let _listener = acceptor.join().unwrap().unwrap();
    let cbuf = cpd.alloc_buffer(4096).unwrap();
    let cmr = cpd.reg_mr(&cbuf, 0, 4096, Access::NONE).unwrap();
    for i in 0..3 {
        let wr = SendWr {
            wr_id: i,
            opcode: Opcode::Send,
            sge: cmr.sge(0, 8),
            remote: None,
            imm: None,
            signaled: true,
        };
        cqp.post_send(wr).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        *got.lock().unwrap(),
        [0, 1, 2],
        "each receive handled by the callback, reposted from inside it"
    );
    assert_eq!(ccq.poll(8).unwrap().len(), 3);
    scq.set_callback(|| {}); // the old closure owned the QP: release it
}
