//! Queue pairs: capacities, the state machine (`Init` → `Connected` →
//! `Error`/`Destroyed`), posting work requests (local checks, completions in
//! posting order), flushing and destroying. What a connected QP does with
//! the peer's traffic is the progress engine (`engine.rs`).
use partvisor_runtime::sync::MutexExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use channels::Doorbell;

use super::context::CtxInner;
use super::cq::CqInner;
use super::pd::{with_mr, PdInner};
use crate::link::{InData, Link, OutData};
use crate::types::*;
use crate::wire::{Kind, Msg};
use crate::{IcError, Result};

/// Largest send queue depth.
pub const MAX_SEND_WR: u32 = 256;
/// Largest receive queue depth.
pub const MAX_RECV_WR: u32 = 4096;

/// Queue pair capacities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Outstanding send-queue work requests.
    pub max_send_wr: u32,
    /// Posted receive work requests.
    pub max_recv_wr: u32,
}

impl Default for QpCaps {
    fn default() -> Self {
        QpCaps {
            max_send_wr: 64,
            max_recv_wr: 256,
        }
    }
}

/// State of a queue pair.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QpState {
    /// Created, not connected; receives may be posted.
    #[default]
    Init,
    /// Connected to a peer.
    Connected,
    /// Broken: work requests are flushed, the peer is gone or misbehaved.
    Error(String),
    /// Destroyed locally.
    Destroyed,
}

impl std::fmt::Display for QpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QpState::Init => f.write_str("not connected"),
            QpState::Connected => f.write_str("connected"),
            QpState::Error(r) => write!(f, "in error ({r})"),
            QpState::Destroyed => f.write_str("destroyed"),
        }
    }
}

pub(super) struct Pending {
    pub(super) seq: u64,
    pub(super) wr: SendWr,
    pub(super) done: Option<WcStatus>,
    pub(super) sent: bool,
}

#[derive(Default)]
pub(super) struct QpSt {
    pub(super) state: QpState,
    pub(super) link: Option<Box<dyn Link>>,
    pub(super) outstanding: VecDeque<Pending>,
    pub(super) recvs: VecDeque<RecvWr>,
    pub(super) incoming: VecDeque<(Msg, InData)>,
    pub(super) rnr_counted: bool,
    pub(super) next_seq: u64,
    pub(super) peer: Option<String>,
}

pub(crate) struct QpInner {
    pub(super) num: u32,
    pub(super) ctx: Weak<CtxInner>,
    pub(super) pd: Arc<PdInner>,
    pub(super) scq: Arc<CqInner>,
    pub(super) rcq: Arc<CqInner>,
    pub(super) caps: QpCaps,
    pub(super) st: Mutex<QpSt>,
    pub(super) counters: QpCounters,
    pub(super) app_poll_deadline: AtomicU64,
    pub(super) stop: AtomicBool,
    pub(super) destroyed: AtomicBool,
    pub(super) engine: Mutex<Option<JoinHandle<()>>>,
    pub(super) wake: Doorbell,
}

/// A queue pair. Dropping it destroys it.
pub struct Qp {
    pub(crate) inner: Arc<QpInner>,
}

impl Qp {
    /// QP number.
    pub fn num(&self) -> u32 {
        self.inner.num
    }

    /// Current state.
    pub fn state(&self) -> QpState {
        self.inner.st.locked().state.clone()
    }

    /// Transport in use, once connected.
    pub fn transport(&self) -> Option<Transport> {
        self.inner.transport()
    }

    /// Counters.
    pub fn stats(&self) -> QpStats {
        self.inner.counters.snapshot()
    }

    /// Name of the connected peer.
    pub fn peer(&self) -> Option<String> {
        self.inner.st.locked().peer.clone()
    }

    /// Posts a send-queue work request. Errors found locally (bad lkey,
    /// length) are reported as error completions, in order, like verbs do;
    /// this call fails only for a full queue, a bad argument or a QP that
    /// was never connected.
    pub fn post_send(&self, wr: SendWr) -> Result<()> {
        let r = self.inner.post_send(wr);
        self.inner.notify_cqs();
        r
    }

    /// Posts a receive work request.
    pub fn post_recv(&self, wr: RecvWr) -> Result<()> {
        let r = self.inner.post_recv(wr);
        self.inner.notify_cqs();
        r
    }

    /// Destroys the QP: its peer is told, its outstanding work requests
    /// complete with [`WcStatus::Flushed`].
    pub fn destroy(self) {
        // Drop does the work.
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        self.inner.shutdown(true);
    }
}

impl QpInner {
    pub(crate) fn transport(&self) -> Option<Transport> {
        self.st.locked().link.as_ref().map(|l| l.transport())
    }

    pub(crate) fn expect_state(&self, want: QpState) -> Result<()> {
        let st = self.st.locked();
        if st.state != want {
            return Err(IcError::InvalidState {
                state: st.state.to_string(),
                hint: "create a new queue pair to connect",
            });
        }
        Ok(())
    }

    pub(crate) fn attach(self: &Arc<Self>, link: Box<dyn Link>, peer: String) -> Result<()> {
        let fds = link.wait_fds();
        {
            let mut st = self.st.locked();
            if st.state != QpState::Init {
                return Err(IcError::InvalidState {
                    state: st.state.to_string(),
                    hint: "create a new queue pair to connect",
                });
            }
            st.link = Some(link);
            st.state = QpState::Connected;
            st.peer = Some(peer);
        }
        let me = self.clone();
        let h = std::thread::Builder::new()
            .name(format!("ic-qp{}", self.num))
            .spawn(move || me.engine_loop(fds))
            .map_err(|e| IcError::io("spawn progress thread", e))?;
        *self.engine.locked() = Some(h);
        Ok(())
    }

    pub(super) fn wc(
        &self,
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u64,
        imm: Option<u32>,
    ) -> WorkCompletion {
        if status == WcStatus::Success {
            QpCounters::add(&self.counters.completions_ok, 1);
        } else {
            QpCounters::add(&self.counters.completions_err, 1);
        }
        WorkCompletion {
            wr_id,
            status,
            opcode,
            byte_len,
            imm,
            qp_num: self.num,
        }
    }

    fn send_wc_opcode(op: Opcode) -> WcOpcode {
        match op {
            Opcode::Send | Opcode::SendWithImm => WcOpcode::Send,
            Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => WcOpcode::RdmaWrite,
            Opcode::RdmaRead => WcOpcode::RdmaRead,
        }
    }

    fn post_send(&self, wr: SendWr) -> Result<()> {
        let needs_remote = matches!(
            wr.opcode,
            Opcode::RdmaWrite | Opcode::RdmaWriteWithImm | Opcode::RdmaRead
        );
        if needs_remote && wr.remote.is_none() {
            return Err(IcError::InvalidArgument(
                "RDMA work request without a remote address".into(),
            ));
        }
        let needs_imm = matches!(wr.opcode, Opcode::SendWithImm | Opcode::RdmaWriteWithImm);
        if needs_imm != wr.imm.is_some() {
            return Err(IcError::InvalidArgument(
                "immediate data must be given exactly for the *WithImm opcodes".into(),
            ));
        }
        let mut st = self.st.locked();
        match &st.state {
            QpState::Connected => {}
            QpState::Error(_) => {
                QpCounters::add(&self.counters.sends_posted, 1);
                let wc = self.wc(
                    wr.wr_id,
                    WcStatus::Flushed,
                    Self::send_wc_opcode(wr.opcode),
                    0,
                    None,
                );
                self.scq.push(wc);
                return Ok(());
            }
            s => {
                return Err(IcError::InvalidState {
                    state: s.to_string(),
                    hint: "connect the queue pair before posting sends",
                })
            }
        }
        if st.outstanding.len() >= self.caps.max_send_wr as usize {
            return Err(IcError::QueueFull("send queue"));
        }
        QpCounters::add(&self.counters.sends_posted, 1);
        let seq = st.next_seq;
        st.next_seq += 1;
        let is_read = wr.opcode == Opcode::RdmaRead;
        let mut done = None;
        let limit = if is_read { MAX_READ } else { MAX_MESSAGE };
        let mr = self.pd.lookup(wr.sge.lkey, false);
        if wr.sge.len > limit {
            done = Some(WcStatus::LocalLength);
        } else if mr
            .as_ref()
            .and_then(|m| {
                with_mr(
                    m,
                    wr.sge.offset,
                    wr.sge.len,
                    if is_read {
                        Access::LOCAL_WRITE
                    } else {
                        Access::NONE
                    },
                    |_, _| (),
                )
            })
            .is_none()
        {
            done = Some(WcStatus::LocalProtection);
        }
        let mut link_err = None;
        if done.is_none() {
            if let (Some(mr), Some(link)) = (mr.as_ref(), st.link.as_mut()) {
                let kind = match wr.opcode {
                    Opcode::Send | Opcode::SendWithImm => Kind::Send,
                    Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => Kind::Write,
                    Opcode::RdmaRead => Kind::Read,
                };
                let mut m = Msg::new(kind, seq);
                m.imm = wr.imm;
                m.len = wr.sge.len;
                if let Some(r) = wr.remote {
                    m.rkey = r.rkey;
                    m.raddr = r.offset;
                }
                let data = if is_read {
                    OutData::None
                } else {
                    OutData::Source {
                        buf: &mr.buf,
                        off: mr.off + wr.sge.offset,
                        len: wr.sge.len,
                    }
                };
                if let Err(e) = link.send(m, data) {
                    link_err = Some(e);
                }
            }
        }
        st.outstanding.push_back(Pending {
            seq,
            wr,
            done,
            sent: done.is_none(),
        });
        if let Some(e) = link_err {
            self.fail(&mut st, Some(format!("sending to peer failed: {e}")));
        } else {
            self.complete_outstanding(&mut st);
        }
        Ok(())
    }

    fn post_recv(&self, wr: RecvWr) -> Result<()> {
        let mut st = self.st.locked();
        match &st.state {
            QpState::Init | QpState::Connected => {}
            QpState::Error(_) => {
                QpCounters::add(&self.counters.recvs_posted, 1);
                let wc = self.wc(wr.wr_id, WcStatus::Flushed, WcOpcode::Recv, 0, None);
                self.rcq.push(wc);
                return Ok(());
            }
            s => {
                return Err(IcError::InvalidState {
                    state: s.to_string(),
                    hint: "the queue pair was destroyed",
                })
            }
        }
        if st.recvs.len() >= self.caps.max_recv_wr as usize {
            return Err(IcError::QueueFull("receive queue"));
        }
        QpCounters::add(&self.counters.recvs_posted, 1);
        st.recvs.push_back(wr);
        Ok(())
    }

    pub(super) fn complete_outstanding(&self, st: &mut QpSt) -> bool {
        let mut worked = false;
        while st.outstanding.front().is_some_and(|p| p.done.is_some()) {
            let Some(p) = st.outstanding.pop_front() else {
                break;
            };
            let status = p.done.unwrap_or(WcStatus::Flushed);
            worked = true;
            if p.wr.signaled || status != WcStatus::Success {
                let len = if status == WcStatus::Success {
                    p.wr.sge.len
                } else {
                    0
                };
                let wc = self.wc(
                    p.wr.wr_id,
                    status,
                    Self::send_wc_opcode(p.wr.opcode),
                    len,
                    None,
                );
                self.scq.push(wc);
            } else if status == WcStatus::Success {
                QpCounters::add(&self.counters.completions_ok, 1);
            }
        }
        worked
    }

    /// The connection failed (send error, bad response): close it, flush
    /// everything, report [`AsyncEvent::PeerLost`].
    pub(super) fn fail(&self, st: &mut QpSt, reason: Option<String>) {
        self.peer_gone(
            st,
            Some(reason.unwrap_or_else(|| "connection failed".into())),
        );
    }

    pub(super) fn peer_gone(&self, st: &mut QpSt, reason: Option<String>) {
        let ev = match &reason {
            None => AsyncEvent::PeerClosed { qp_num: self.num },
            Some(r) => AsyncEvent::PeerLost {
                qp_num: self.num,
                reason: r.clone(),
            },
        };
        if let Some(l) = st.link.as_mut() {
            l.close();
        }
        self.flush(
            st,
            QpState::Error(reason.unwrap_or_else(|| "peer closed the connection".into())),
        );
        if let Some(c) = self.ctx.upgrade() {
            c.push_event(ev);
        }
    }

    fn flush(&self, st: &mut QpSt, new_state: QpState) {
        st.state = new_state;
        for p in &mut st.outstanding {
            if p.done.is_none() {
                p.done = Some(WcStatus::Flushed);
            }
        }
        self.complete_outstanding(st);
        while let Some(r) = st.recvs.pop_front() {
            let wc = self.wc(r.wr_id, WcStatus::Flushed, WcOpcode::Recv, 0, None);
            self.rcq.push(wc);
        }
        st.incoming.clear();
    }

    /// Destroy (`final_ = true`, releases the PD/CQs) or reset to error.
    pub(crate) fn shutdown(&self, final_: bool) {
        if self.destroyed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut st = self.st.locked();
            if matches!(st.state, QpState::Init | QpState::Connected) {
                let state = if final_ {
                    QpState::Destroyed
                } else {
                    QpState::Error("port reset or access layer closed".into())
                };
                if let Some(l) = st.link.as_mut() {
                    l.close();
                }
                self.flush(&mut st, state);
            } else if final_ {
                st.state = QpState::Destroyed;
            }
        }
        self.notify_cqs();
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.notify();
        if let Some(h) = self.engine.locked().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        if final_ && !self.destroyed.swap(true, Ordering::AcqRel) {
            self.st.locked().link = None;
            self.pd.live_qps.fetch_sub(1, Ordering::AcqRel);
            self.scq.users.fetch_sub(1, Ordering::AcqRel);
            self.rcq.users.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, eventually, ids, pair, wr, PATIENCE};
    use super::*;
    use std::time::Duration;

    fn caps(max_send_wr: u32, max_recv_wr: u32) -> QpCaps {
        QpCaps {
            max_send_wr,
            max_recv_wr,
        }
    }

    #[test]
    fn create_qp_accepts_depths_up_to_the_limits_only() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let cq = c.create_cq(16).unwrap();
        for bad in [
            caps(0, 1),
            caps(1, 0),
            caps(MAX_SEND_WR + 1, 1),
            caps(1, MAX_RECV_WR + 1),
        ] {
            assert!(
                matches!(
                    c.create_qp(&pd, &cq, &cq, bad),
                    Err(IcError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
        let qp = c
            .create_qp(&pd, &cq, &cq, caps(MAX_SEND_WR, MAX_RECV_WR))
            .unwrap();
        assert_eq!(qp.inner.caps, caps(MAX_SEND_WR, MAX_RECV_WR));
        assert_eq!(c.query().qps, 1);
    }

    #[test]
    fn a_new_qp_is_init_takes_receives_up_to_its_depth_and_refuses_sends() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let cq = c.create_cq(16).unwrap();
        let buf = pd.alloc_buffer(4096).unwrap();
        let mr = pd.reg_mr(&buf, 0, 4096, Access::LOCAL_WRITE).unwrap();
        let qp = c.create_qp(&pd, &cq, &cq, caps(4, 2)).unwrap();
        assert_eq!(qp.state(), QpState::Init);
        assert_eq!((qp.transport(), qp.peer()), (None, None));
        for id in [1, 2] {
            qp.post_recv(RecvWr {
                wr_id: id,
                sge: mr.sge(0, 64),
            })
            .unwrap();
        }
        assert!(matches!(
            qp.post_recv(RecvWr {
                wr_id: 3,
                sge: mr.sge(0, 64)
            }),
            Err(IcError::QueueFull("receive queue"))
        ));
        assert!(matches!(
            qp.post_send(wr(4, Opcode::Send, mr.sge(0, 8), None)),
            Err(IcError::InvalidState { .. })
        ));
        let s = qp.stats();
        assert_eq!((s.recvs_posted, s.sends_posted), (2, 0));
        assert!(
            cq.poll(8).unwrap().is_empty(),
            "nothing completes before connect"
        );
    }

    #[test]
    fn immediate_data_and_remote_addresses_are_checked_against_the_opcode() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let cq = c.create_cq(16).unwrap();
        let qp = c.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
        let sge = Sge {
            lkey: 1,
            offset: 0,
            len: 8,
        };
        let remote = Some(RemoteAddr { rkey: 1, offset: 0 });
        let bad = [
            SendWr {
                imm: None,
                ..wr(1, Opcode::SendWithImm, sge, None)
            },
            SendWr {
                imm: Some(7),
                ..wr(2, Opcode::Send, sge, None)
            },
            SendWr {
                imm: Some(7),
                ..wr(3, Opcode::RdmaWrite, sge, remote)
            },
            wr(4, Opcode::RdmaWrite, sge, None),
            wr(5, Opcode::RdmaRead, sge, None),
            SendWr {
                imm: Some(7),
                ..wr(6, Opcode::RdmaWriteWithImm, sge, None)
            },
        ];
        for w in bad {
            assert!(
                matches!(qp.post_send(w), Err(IcError::InvalidArgument(_))),
                "{w:?}"
            );
        }
        assert_eq!(qp.stats().sends_posted, 0);
    }

    #[test]
    fn connecting_moves_both_sides_to_connected_and_a_second_connect_is_refused() {
        let p = pair(Transport::Shm, QpCaps::default());
        assert_eq!(p.cli.qp.state(), QpState::Connected);
        assert_eq!(p.srv.qp.state(), QpState::Connected);
        assert_eq!(p.cli.qp.transport(), Some(Transport::Shm));
        assert_eq!(p.cli.qp.peer().as_deref(), Some("svc"));
        assert_eq!(p.srv.qp.peer().as_deref(), Some("cli"));
        assert!(matches!(
            p.cli
                .ctx
                .connect(&p.cli.qp, "svc", Some(Transport::Shm), PATIENCE),
            Err(IcError::InvalidState { .. })
        ));
        let ports = p.cli.ctx.query_ports();
        let active: Vec<_> = ports.iter().map(|p| (p.transport, p.active_qps)).collect();
        assert_eq!(active, [(Transport::Shm, 1), (Transport::Tcp, 0)]);
    }

    #[test]
    fn the_send_queue_holds_at_most_max_send_wr_outstanding_requests() {
        let p = pair(Transport::Shm, caps(2, 4));
        let (_sbuf, smr) = p.cli.region(4096, 1, Access::NONE);
        // No receive posted at the target: both SENDs stay outstanding.
        for id in [1, 2] {
            p.cli
                .qp
                .post_send(wr(id, Opcode::Send, smr.sge(0, 8), None))
                .unwrap();
        }
        assert!(matches!(
            p.cli.qp.post_send(wr(3, Opcode::Send, smr.sge(0, 8), None)),
            Err(IcError::QueueFull("send queue"))
        ));
        let rbuf = p.srv.buffer(4096, 0);
        let rmr = p
            .srv
            .pd
            .reg_mr(&rbuf, 0, 4096, Access::LOCAL_WRITE)
            .unwrap();
        for id in [10, 11] {
            p.srv
                .qp
                .post_recv(RecvWr {
                    wr_id: id,
                    sge: rmr.sge(0, 64),
                })
                .unwrap();
        }
        let done = p.cli.poll_n(2);
        assert_eq!(ids(&done), [(1, WcStatus::Success), (2, WcStatus::Success)]);
        p.cli
            .qp
            .post_send(wr(3, Opcode::Send, smr.sge(0, 8), None))
            .unwrap();
        assert_eq!(p.cli.qp.stats().sends_posted, 3);
    }

    #[test]
    fn local_errors_complete_in_posting_order_behind_earlier_requests() {
        let p = pair(Transport::Shm, QpCaps::default());
        let (_sbuf, smr) = p.cli.region(4096, 1, Access::NONE);
        let q = &p.cli.qp;
        q.post_send(wr(1, Opcode::Send, smr.sge(0, 8), None))
            .unwrap();
        let no_such_lkey = Sge {
            lkey: 0,
            offset: 0,
            len: 8,
        };
        q.post_send(wr(2, Opcode::Send, no_such_lkey, None))
            .unwrap();
        q.post_send(wr(3, Opcode::Send, smr.sge(4000, 200), None))
            .unwrap();
        q.post_send(wr(4, Opcode::Send, smr.sge(0, MAX_MESSAGE + 1), None))
            .unwrap();
        // A READ writes into the local region: it needs LOCAL_WRITE.
        let remote = Some(RemoteAddr { rkey: 1, offset: 0 });
        q.post_send(wr(5, Opcode::RdmaRead, smr.sge(0, 8), remote))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            p.cli.cq.poll(8).unwrap().is_empty(),
            "errors wait behind the SEND the target has not received yet"
        );
        let rbuf = p.srv.buffer(4096, 0);
        let rmr = p
            .srv
            .pd
            .reg_mr(&rbuf, 0, 4096, Access::LOCAL_WRITE)
            .unwrap();
        p.srv
            .qp
            .post_recv(RecvWr {
                wr_id: 9,
                sge: rmr.sge(0, 64),
            })
            .unwrap();
        let done = p.cli.poll_n(5);
        assert_eq!(
            ids(&done),
            [
                (1, WcStatus::Success),
                (2, WcStatus::LocalProtection),
                (3, WcStatus::LocalProtection),
                (4, WcStatus::LocalLength),
                (5, WcStatus::LocalProtection),
            ]
        );
        assert_eq!(done[4].opcode, WcOpcode::RdmaRead);
        let s = q.stats();
        assert_eq!((s.completions_ok, s.completions_err), (1, 4));
    }

    #[test]
    fn unsignaled_successful_sends_make_no_completion_but_are_counted() {
        let p = pair(Transport::Shm, QpCaps::default());
        let rbuf = p.srv.buffer(4096, 0);
        let rmr = p
            .srv
            .pd
            .reg_mr(&rbuf, 0, 4096, Access::LOCAL_WRITE)
            .unwrap();
        for id in [10, 11] {
            p.srv
                .qp
                .post_recv(RecvWr {
                    wr_id: id,
                    sge: rmr.sge(0, 64),
                })
                .unwrap();
        }
        let (_sbuf, smr) = p.cli.region(4096, 1, Access::NONE);
        let quiet = SendWr {
            signaled: false,
            ..wr(1, Opcode::Send, smr.sge(0, 8), None)
        };
        p.cli.qp.post_send(quiet).unwrap();
        p.cli
            .qp
            .post_send(wr(2, Opcode::Send, smr.sge(0, 8), None))
            .unwrap();
        assert_eq!(ids(&p.cli.poll_n(1)), [(2, WcStatus::Success)]);
        assert_eq!(p.cli.qp.stats().completions_ok, 2);
        assert_eq!(p.srv.poll_n(2).len(), 2);
    }

    #[test]
    fn destroying_a_connected_qp_flushes_its_sends_and_the_peer_sees_peer_closed() {
        let p = pair(Transport::Shm, QpCaps::default());
        let (_sbuf, smr) = p.cli.region(4096, 1, Access::NONE);
        p.cli
            .qp
            .post_send(wr(7, Opcode::Send, smr.sge(0, 8), None))
            .unwrap();
        let srv_num = p.srv.qp.num();
        p.cli.qp.destroy();
        let flushed = p.cli.cq.poll(8).unwrap();
        assert_eq!(ids(&flushed), [(7, WcStatus::Flushed)]);
        assert_eq!(flushed[0].byte_len, 0);
        assert_eq!(p.cli.ctx.query().qps, 0);
        assert_eq!(
            p.srv.ctx.get_async_event(PATIENCE),
            Some(AsyncEvent::PeerClosed { qp_num: srv_num })
        );
        assert!(matches!(p.srv.qp.state(), QpState::Error(_)));
    }

    #[test]
    fn after_a_port_reset_posts_complete_flushed_and_the_peer_is_told() {
        let p = pair(Transport::Shm, QpCaps::default());
        assert_eq!(p.srv.ctx.port_reset(Transport::Tcp), 0);
        assert_eq!(p.srv.ctx.port_reset(Transport::Shm), 1);
        assert_eq!(
            p.srv.qp.state(),
            QpState::Error("port reset or access layer closed".into())
        );
        let (_buf, mr) = p.srv.region(4096, 0, Access::LOCAL_WRITE);
        p.srv
            .qp
            .post_recv(RecvWr {
                wr_id: 1,
                sge: mr.sge(0, 8),
            })
            .unwrap();
        p.srv
            .qp
            .post_send(wr(2, Opcode::Send, mr.sge(0, 8), None))
            .unwrap();
        let wcs = p.srv.cq.poll(8).unwrap();
        assert_eq!(ids(&wcs), [(1, WcStatus::Flushed), (2, WcStatus::Flushed)]);
        assert_eq!(
            wcs.iter().map(|w| w.opcode).collect::<Vec<_>>(),
            [WcOpcode::Recv, WcOpcode::Send]
        );
        let s = p.srv.qp.stats();
        assert_eq!(
            (s.recvs_posted, s.sends_posted, s.completions_err),
            (1, 1, 2)
        );
        let cli_num = p.cli.qp.num();
        assert_eq!(
            p.cli.ctx.get_async_event(PATIENCE),
            Some(AsyncEvent::PeerClosed { qp_num: cli_num })
        );
        assert!(eventually(|| matches!(p.cli.qp.state(), QpState::Error(_))));
    }

    #[test]
    fn a_destroyed_qp_releases_its_pd_and_cqs() {
        let c = ctx("a");
        let pd = c.alloc_pd().unwrap();
        let cq = c.create_cq(16).unwrap();
        let qp = c.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
        assert_eq!(pd.inner.live_qps.load(Ordering::Acquire), 1);
        assert_eq!(cq.inner.users.load(Ordering::Acquire), 2);
        let inner = qp.inner.clone();
        qp.destroy();
        assert_eq!(inner.st.locked().state, QpState::Destroyed);
        assert_eq!(pd.inner.live_qps.load(Ordering::Acquire), 0);
        assert_eq!(cq.inner.users.load(Ordering::Acquire), 0);
        inner.shutdown(true);
        assert_eq!(
            pd.inner.live_qps.load(Ordering::Acquire),
            0,
            "a second shutdown releases nothing again"
        );
    }

    #[test]
    fn qp_states_read_as_words() {
        assert_eq!(QpState::default(), QpState::Init);
        assert_eq!(QpState::Init.to_string(), "not connected");
        assert_eq!(QpState::Connected.to_string(), "connected");
        assert_eq!(QpState::Error("x".into()).to_string(), "in error (x)");
        assert_eq!(QpState::Destroyed.to_string(), "destroyed");
    }
}
