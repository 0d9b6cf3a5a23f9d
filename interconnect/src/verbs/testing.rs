//! Support for the verbs unit tests: access layers in this process sharing
//! an in-memory directory, and a QP connected between two of them over a
//! real transport (shm or tcp loopback).
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Context, ContextOptions, Cq, Mr, Pd, Qp, QpCaps};
use crate::alloc::Buffer;
use crate::connect::Listener;
use crate::directory::{Directory, MemDirectory};
use crate::types::*;

/// How long a test waits for something the peer does.
pub(super) const PATIENCE: Duration = Duration::from_secs(10);

/// An access layer with a directory of its own.
pub(super) fn ctx(name: &str) -> Context {
    Context::open(
        name,
        Arc::new(MemDirectory::default()),
        ContextOptions::default(),
    )
    .unwrap()
}

/// One side of a connection: its access layer, PD, CQ (send and receive)
/// and QP.
pub(super) struct End {
    pub qp: Qp,
    pub cq: Cq,
    pub pd: Pd,
    pub ctx: Context,
}

impl End {
    fn new(ctx: Context, caps: QpCaps) -> End {
        let pd = ctx.alloc_pd().unwrap();
        let cq = ctx.create_cq(256).unwrap();
        let qp = ctx.create_qp(&pd, &cq, &cq, caps).unwrap();
        End { qp, cq, pd, ctx }
    }

    /// A buffer of `len` bytes, every byte `fill`.
    pub fn buffer(&self, len: u64, fill: u8) -> Buffer {
        let b = self.pd.alloc_buffer(len).unwrap();
        b.write_at(0, &vec![fill; len as usize]).unwrap();
        b
    }

    /// A buffer of `len` bytes filled with `fill`, registered whole with `access`.
    pub fn region(&self, len: u64, fill: u8, access: Access) -> (Buffer, Mr) {
        let b = self.buffer(len, fill);
        let mr = self.pd.reg_mr(&b, 0, len, access).unwrap();
        (b, mr)
    }

    /// Polls until `n` completions arrived (or [`PATIENCE`] ran out).
    pub fn poll_n(&self, n: usize) -> Vec<WorkCompletion> {
        poll_n(&self.cq, n)
    }
}

/// Polls `cq` until `n` completions arrived (or [`PATIENCE`] ran out).
pub(super) fn poll_n(cq: &Cq, n: usize) -> Vec<WorkCompletion> {
    let deadline = Instant::now() + PATIENCE;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        let left = n - out.len();
        if cq.poll_into(&mut out, left).unwrap() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    out
}

/// Waits until `cond` holds (or [`PATIENCE`] ran out); returns whether it did.
pub(super) fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// `srv` listens as "svc" allowing "cli"; `cli` is connected to it over `t`.
pub(super) struct Pair {
    pub cli: End,
    pub srv: End,
    _listener: Listener,
}

/// A connected pair whose two QPs have `caps`.
pub(super) fn pair(t: Transport, caps: QpCaps) -> Pair {
    let dir: Arc<dyn Directory> = Arc::new(MemDirectory::default());
    let open = |name| Context::open(name, dir.clone(), ContextOptions::default()).unwrap();
    let srv = End::new(open("srv"), caps);
    let cli = End::new(open("cli"), caps);
    let listener = srv.ctx.listen("svc", &["cli"]).unwrap();
    std::thread::scope(|s| {
        let accepted = s.spawn(|| listener.accept(&srv.qp, PATIENCE));
        cli.ctx.connect(&cli.qp, "svc", Some(t), PATIENCE).unwrap();
        assert_eq!(accepted.join().unwrap().unwrap(), "cli");
    });
    Pair {
        cli,
        srv,
        _listener: listener,
    }
}

/// A signaled work request without immediate data.
pub(super) fn wr(wr_id: u64, opcode: Opcode, sge: Sge, remote: Option<RemoteAddr>) -> SendWr {
    SendWr {
        wr_id,
        opcode,
        sge,
        remote,
        imm: None,
        signaled: true,
    }
}

/// `(wr_id, status)` of each completion, for compact assertions.
pub(super) fn ids(wcs: &[WorkCompletion]) -> Vec<(u64, WcStatus)> {
    wcs.iter().map(|w| (w.wr_id, w.status)).collect()
}
