//! The progress engine: one thread per connected QP (standing back while
//! the application polls), and the code that applies the peer's requests
//! to our memory and its responses to our outstanding work requests.
//!
//! Every remote operation is applied here, by the target: the rkey is
//! looked up in this QP's own PD, the access flag and the bounds are
//! checked, and the copy runs under the MR's registration lock (see the
//! crate doc's threat model).
use partvisor_runtime::sync::{MutexExt, RwLockExt};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use channels::Waiter;

use super::pd::with_mr;
use super::qp::{QpInner, QpSt, QpState, MAX_SEND_WR};
use super::{now_ns, poll_fds};
use crate::link::{InData, LinkEvent, OutData};
use crate::types::*;
use crate::wire::{Kind, Msg, RESP_WITH_DATA};

/// Most requests a peer may have queued at us before we call it hostile.
const MAX_INCOMING: usize = 4 * MAX_SEND_WR as usize;
/// Messages handled per progress call, so one busy peer cannot starve others.
const BATCH: usize = 256;

impl QpInner {
    pub(super) fn engine_loop(self: Arc<Self>, mut fds: Vec<RawFd>) {
        fds.push(self.wake.fd().as_raw_fd());
        let mut waiter = Waiter::new(Duration::from_micros(50));
        while !self.stop.load(Ordering::Acquire) {
            if self.st.locked().state != QpState::Connected {
                break;
            }
            if now_ns() < self.app_poll_deadline.load(Ordering::Relaxed) {
                // The application is polling and drives progress itself:
                // stay off its CPU; look in every millisecond (peer death,
                // control messages) or when woken for shutdown.
                poll_fds(&[self.wake.fd().as_raw_fd()], Duration::from_millis(1));
                self.try_progress();
                continue;
            }
            // SAFETY: the fds belong to the link (and self.wake), which live
            // until this thread has been joined.
            let bfds: Vec<BorrowedFd<'_>> = fds
                .iter()
                .map(|&f| unsafe { BorrowedFd::borrow_raw(f) })
                .collect();
            let r = waiter.wait(
                || self.stop.load(Ordering::Acquire) || self.progress_blocking(),
                |s| {
                    if let Some(l) = self.st.locked().link.as_ref() {
                        l.arm(s)
                    }
                },
                &bfds,
                Duration::from_millis(500),
            );
            if r.is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.wake.drain();
        }
    }

    fn progress_blocking(&self) -> bool {
        let worked = {
            let mut st = self.st.locked();
            self.progress(&mut st)
        };
        self.notify_cqs();
        worked
    }

    pub(crate) fn try_progress(&self) -> bool {
        let worked = match self.st.try_locked() {
            Some(mut st) => self.progress(&mut st),
            None => false,
        };
        self.notify_cqs();
        worked
    }

    /// Fires CQ notifications that became due while the QP lock was held.
    pub(super) fn notify_cqs(&self) {
        self.scq.notify_pending();
        self.rcq.notify_pending();
    }

    fn progress(&self, st: &mut QpSt) -> bool {
        if st.state != QpState::Connected {
            return false;
        }
        let mut worked = false;
        for _ in 0..BATCH {
            let Some(link) = st.link.as_mut() else { break };
            match link.try_recv() {
                None => break,
                Some(LinkEvent::Msg(m, d)) => {
                    worked = true;
                    self.on_msg(st, m, d);
                }
                Some(LinkEvent::Closed) => {
                    self.peer_gone(st, None);
                    return true;
                }
                Some(LinkEvent::Lost(r)) => {
                    self.peer_gone(st, Some(r));
                    return true;
                }
            }
            if st.state != QpState::Connected {
                return true;
            }
        }
        worked |= self.process_incoming(st);
        worked |= self.complete_outstanding(st);
        worked
    }

    fn on_msg(&self, st: &mut QpSt, m: Msg, d: InData) {
        match m.kind {
            Kind::Send | Kind::Write | Kind::Read => {
                if st.incoming.len() >= MAX_INCOMING {
                    self.peer_gone(st, Some("peer exceeded its send queue depth".into()));
                    return;
                }
                st.incoming.push_back((m, d));
            }
            Kind::Resp => self.on_resp(st, m, d),
            Kind::ReadDone | Kind::Close => {}
        }
    }

    fn on_resp(&self, st: &mut QpSt, m: Msg, d: InData) {
        let Some(p) = st
            .outstanding
            .iter_mut()
            .find(|p| p.sent && p.done.is_none())
        else {
            self.fail(
                st,
                Some("peer sent a response to no outstanding request".into()),
            );
            return;
        };
        let mut status = match WcStatus::from_code(m.status) {
            Some(s) if p.seq == m.seq => s,
            _ => WcStatus::BadResponse,
        };
        if status == WcStatus::Success {
            if p.wr.opcode == Opcode::RdmaRead {
                let len = p.wr.sge.len;
                if m.len != len || m.src_id != RESP_WITH_DATA || !d.valid_for(len) {
                    status = WcStatus::BadResponse;
                } else {
                    let placed = self.pd.lookup(p.wr.sge.lkey, false).and_then(|mr| {
                        with_mr(
                            &mr,
                            p.wr.sge.offset,
                            len,
                            Access::LOCAL_WRITE,
                            |map, off| d.copy_into(map, off, len),
                        )
                    });
                    status = if placed == Some(true) {
                        QpCounters::add(&self.counters.bytes_in, len);
                        WcStatus::Success
                    } else {
                        WcStatus::LocalProtection
                    };
                }
            } else {
                QpCounters::add(&self.counters.bytes_out, p.wr.sge.len);
            }
        }
        p.done = Some(status);
        if m.src_id == RESP_WITH_DATA {
            if let Some(l) = st.link.as_mut() {
                let _ = l.read_done();
            }
        }
        if status == WcStatus::BadResponse {
            self.fail(st, Some("peer sent a bad response".into()));
        }
    }

    fn respond(&self, st: &mut QpSt, seq: u64, status: WcStatus, data: OutData<'_>) -> bool {
        let mut r = Msg::new(Kind::Resp, seq);
        r.status = status.code();
        if let OutData::ReadData { len, .. } = &data {
            r.len = *len;
            r.src_id = RESP_WITH_DATA;
        }
        if status == WcStatus::Success {
            QpCounters::add(&self.counters.remote_ops_applied, 1);
        } else {
            QpCounters::add(&self.counters.remote_ops_refused, 1);
        }
        let res = match st.link.as_mut() {
            Some(l) => l.send(r, data),
            None => Err("no link".into()),
        };
        if let Err(e) = res {
            self.fail(st, Some(format!("sending response failed: {e}")));
            return false;
        }
        true
    }

    /// Applies queued peer requests in order. SENDs and WRITE_WITH_IMMs wait
    /// for a posted receive (receiver-not-ready), READs for the read window.
    fn process_incoming(&self, st: &mut QpSt) -> bool {
        let mut worked = false;
        while let Some((m, _)) = st.incoming.front() {
            let m = *m;
            let needs_recv = m.kind == Kind::Send || (m.kind == Kind::Write && m.imm.is_some());
            if needs_recv && st.recvs.is_empty() {
                if !st.rnr_counted {
                    st.rnr_counted = true;
                    QpCounters::add(&self.counters.rnr_waits, 1);
                }
                break;
            }
            if m.kind == Kind::Read && !st.link.as_ref().is_some_and(|l| l.read_window_free()) {
                break;
            }
            st.rnr_counted = false;
            let Some((m, d)) = st.incoming.pop_front() else {
                break;
            };
            worked = true;
            let ok = match m.kind {
                Kind::Send => self.apply_send(st, m, d),
                Kind::Write => self.apply_write(st, m, d),
                _ => self.apply_read(st, m),
            };
            if !ok {
                break;
            }
        }
        worked
    }

    fn apply_send(&self, st: &mut QpSt, m: Msg, d: InData) -> bool {
        if !d.valid_for(m.len) {
            return self.respond(st, m.seq, WcStatus::RemoteOperation, OutData::None);
        }
        let Some(r) = st.recvs.pop_front() else {
            return false;
        };
        let (rstatus, sstatus) = if m.len > r.sge.len {
            (WcStatus::LocalLength, WcStatus::RemoteOperation)
        } else {
            let placed = self.pd.lookup(r.sge.lkey, false).and_then(|mr| {
                with_mr(&mr, r.sge.offset, m.len, Access::LOCAL_WRITE, |map, off| {
                    d.copy_into(map, off, m.len)
                })
            });
            match placed {
                Some(true) => (WcStatus::Success, WcStatus::Success),
                Some(false) => (WcStatus::LocalProtection, WcStatus::RemoteOperation),
                None => (WcStatus::LocalProtection, WcStatus::RemoteOperation),
            }
        };
        if rstatus == WcStatus::Success {
            QpCounters::add(&self.counters.bytes_in, m.len);
        }
        let wc = self.wc(
            r.wr_id,
            rstatus,
            WcOpcode::Recv,
            if rstatus == WcStatus::Success {
                m.len
            } else {
                0
            },
            m.imm,
        );
        self.rcq.push(wc);
        self.respond(st, m.seq, sstatus, OutData::None)
    }

    fn apply_write(&self, st: &mut QpSt, m: Msg, d: InData) -> bool {
        if !d.valid_for(m.len) {
            return self.respond(st, m.seq, WcStatus::RemoteOperation, OutData::None);
        }
        let placed = self.pd.lookup(m.rkey, true).and_then(|mr| {
            with_mr(&mr, m.raddr, m.len, Access::REMOTE_WRITE, |map, off| {
                d.copy_into(map, off, m.len)
            })
        });
        let status = match placed {
            Some(true) => WcStatus::Success,
            Some(false) => WcStatus::RemoteOperation,
            None => WcStatus::RemoteAccess,
        };
        if status == WcStatus::Success {
            QpCounters::add(&self.counters.bytes_in, m.len);
            if m.imm.is_some() {
                if let Some(r) = st.recvs.pop_front() {
                    let wc = self.wc(
                        r.wr_id,
                        WcStatus::Success,
                        WcOpcode::RecvRdmaWithImm,
                        m.len,
                        m.imm,
                    );
                    self.rcq.push(wc);
                }
            }
        }
        self.respond(st, m.seq, status, OutData::None)
    }

    fn apply_read(&self, st: &mut QpSt, m: Msg) -> bool {
        if m.len > MAX_READ {
            return self.respond(st, m.seq, WcStatus::RemoteOperation, OutData::None);
        }
        let Some(mr) = self.pd.lookup(m.rkey, true) else {
            return self.respond(st, m.seq, WcStatus::RemoteAccess, OutData::None);
        };
        let valid = mr.valid.read_locked();
        if !*valid
            || !mr.access.contains(Access::REMOTE_READ)
            || m.raddr.checked_add(m.len).is_none_or(|e| e > mr.len)
        {
            drop(valid);
            return self.respond(st, m.seq, WcStatus::RemoteAccess, OutData::None);
        }
        QpCounters::add(&self.counters.bytes_out, m.len);
        let data = OutData::ReadData {
            map: mr.buf.map(),
            off: mr.off + m.raddr,
            len: m.len,
        };
        let ok = self.respond(st, m.seq, WcStatus::Success, data);
        drop(valid);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{eventually, ids, pair, poll_n, wr, Pair};
    use super::super::QpCaps;
    use super::*;
    use crate::alloc::Buffer;

    fn bytes(buf: &Buffer, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        buf.read_at(off, &mut v).unwrap();
        v
    }

    fn recv(p: &Pair, wr_id: u64, sge: Sge) {
        p.srv.qp.post_recv(RecvWr { wr_id, sge }).unwrap();
    }

    #[test]
    fn a_send_with_imm_lands_in_the_first_posted_receive() {
        let p = pair(Transport::Shm, QpCaps::default());
        let rbuf = p.srv.buffer(8192, 0);
        let rmr = p
            .srv
            .pd
            .reg_mr(&rbuf, 0, 8192, Access::LOCAL_WRITE)
            .unwrap();
        recv(&p, 1, rmr.sge(0, 4096));
        recv(&p, 2, rmr.sge(4096, 4096));
        let (_sbuf, smr) = p.cli.region(4096, b'A', Access::NONE);
        let send = SendWr {
            imm: Some(99),
            ..wr(10, Opcode::SendWithImm, smr.sge(0, 100), None)
        };
        p.cli.qp.post_send(send).unwrap();
        let sent = p.cli.poll_n(1);
        assert_eq!(ids(&sent), [(10, WcStatus::Success)]);
        assert_eq!((sent[0].opcode, sent[0].byte_len), (WcOpcode::Send, 100));
        let got = p.srv.poll_n(1);
        assert_eq!(ids(&got), [(1, WcStatus::Success)]);
        assert_eq!(
            (got[0].opcode, got[0].byte_len, got[0].imm, got[0].qp_num),
            (WcOpcode::Recv, 100, Some(99), p.srv.qp.num())
        );
        assert_eq!(
            bytes(&rbuf, 0, 101),
            [[b'A'; 100].as_slice(), &[0]].concat()
        );
        let (c, s) = (p.cli.qp.stats(), p.srv.qp.stats());
        assert_eq!((c.bytes_out, c.completions_ok), (100, 1));
        assert_eq!((s.bytes_in, s.remote_ops_applied), (100, 1));
    }

    #[test]
    fn the_target_engine_applies_requests_without_the_target_polling() {
        let p = pair(Transport::Shm, QpCaps::default());
        let tbuf = p.srv.buffer(4096, 0);
        let tmr = p
            .srv
            .pd
            .reg_mr(&tbuf, 0, 4096, Access::REMOTE_WRITE)
            .unwrap();
        let (_sbuf, smr) = p.cli.region(4096, 3, Access::NONE);
        let w = wr(1, Opcode::RdmaWrite, smr.sge(0, 64), Some(tmr.remote(0)));
        p.cli.qp.post_send(w).unwrap();
        // Only the initiator polls; the target's own thread did the copy.
        assert_eq!(ids(&p.cli.poll_n(1)), [(1, WcStatus::Success)]);
        assert_eq!(bytes(&tbuf, 0, 64), [3; 64]);
    }

    #[test]
    fn a_send_longer_than_the_receive_fails_on_both_sides() {
        let p = pair(Transport::Shm, QpCaps::default());
        let rbuf = p.srv.buffer(4096, 0);
        let rmr = p
            .srv
            .pd
            .reg_mr(&rbuf, 0, 4096, Access::LOCAL_WRITE)
            .unwrap();
        recv(&p, 1, rmr.sge(0, 10));
        let (_sbuf, smr) = p.cli.region(4096, 5, Access::NONE);
        p.cli
            .qp
            .post_send(wr(2, Opcode::Send, smr.sge(0, 20), None))
            .unwrap();
        assert_eq!(ids(&p.cli.poll_n(1)), [(2, WcStatus::RemoteOperation)]);
        let got = p.srv.poll_n(1);
        assert_eq!(ids(&got), [(1, WcStatus::LocalLength)]);
        assert_eq!(got[0].byte_len, 0);
        assert_eq!(bytes(&rbuf, 0, 20), [0; 20], "nothing was placed");
        assert_eq!(p.srv.qp.stats().remote_ops_refused, 1);
        assert_eq!(p.cli.qp.state(), QpState::Connected, "the QP survives");
    }

    #[test]
    fn a_send_waits_for_a_receive_and_counts_one_receiver_not_ready_wait() {
        let p = pair(Transport::Shm, QpCaps::default());
        let (_sbuf, smr) = p.cli.region(4096, 8, Access::NONE);
        p.cli
            .qp
            .post_send(wr(1, Opcode::Send, smr.sge(0, 8), None))
            .unwrap();
        assert!(eventually(|| p.srv.qp.stats().rnr_waits == 1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(p.srv.qp.stats().rnr_waits, 1, "counted once per wait");
        assert!(p.cli.cq.poll(4).unwrap().is_empty());
        let rbuf = p.srv.buffer(4096, 0);
        let rmr = p
            .srv
            .pd
            .reg_mr(&rbuf, 0, 4096, Access::LOCAL_WRITE)
            .unwrap();
        recv(&p, 5, rmr.sge(0, 64));
        assert_eq!(ids(&p.cli.poll_n(1)), [(1, WcStatus::Success)]);
        assert_eq!(ids(&p.srv.poll_n(1)), [(5, WcStatus::Success)]);
        assert_eq!(bytes(&rbuf, 0, 8), [8; 8]);
    }

    #[test]
    fn rdma_write_lands_only_inside_a_region_with_remote_write() {
        let p = pair(Transport::Shm, QpCaps::default());
        let tbuf = p.srv.buffer(8192, 0);
        let rw = p
            .srv
            .pd
            .reg_mr(&tbuf, 0, 4096, Access::REMOTE_WRITE)
            .unwrap();
        let local_only = p
            .srv
            .pd
            .reg_mr(&tbuf, 4096, 4096, Access::LOCAL_WRITE | Access::REMOTE_READ)
            .unwrap();
        let (_sbuf, smr) = p.cli.region(4096, 9, Access::NONE);
        let to = |id, len, remote| wr(id, Opcode::RdmaWrite, smr.sge(0, len), Some(remote));
        let lkey_as_rkey = RemoteAddr {
            rkey: rw.lkey(),
            offset: 0,
        };
        for w in [
            to(1, 16, rw.remote(100)),
            to(2, 16, local_only.remote(0)),
            to(3, 16, rw.remote(4090)),
            to(4, 16, lkey_as_rkey),
            to(5, 6, rw.remote(4090)),
        ] {
            p.cli.qp.post_send(w).unwrap();
        }
        assert_eq!(
            ids(&p.cli.poll_n(5)),
            [
                (1, WcStatus::Success),
                (2, WcStatus::RemoteAccess),
                (3, WcStatus::RemoteAccess),
                (4, WcStatus::RemoteAccess),
                (5, WcStatus::Success),
            ]
        );
        let mut want = vec![0u8; 8192];
        want[100..116].fill(9);
        want[4090..4096].fill(9);
        assert_eq!(bytes(&tbuf, 0, 8192), want);
        let s = p.srv.qp.stats();
        assert_eq!((s.remote_ops_applied, s.remote_ops_refused), (2, 3));
        assert!(
            p.srv.cq.poll(4).unwrap().is_empty(),
            "plain writes take no receive"
        );
    }

    #[test]
    fn rdma_write_with_a_deregistered_rkey_is_refused_on_every_transport() {
        for t in [Transport::Shm, Transport::Tcp] {
            let p = pair(t, QpCaps::default());
            let tbuf = p.srv.buffer(4096, 0);
            let tmr = p
                .srv
                .pd
                .reg_mr(&tbuf, 0, 4096, Access::REMOTE_WRITE)
                .unwrap();
            let (sbuf, smr) = p.cli.region(4096, 1, Access::NONE);
            let w = wr(1, Opcode::RdmaWrite, smr.sge(0, 32), Some(tmr.remote(0)));
            p.cli.qp.post_send(w).unwrap();
            assert_eq!(ids(&p.cli.poll_n(1)), [(1, WcStatus::Success)], "{t:?}");
            tmr.deregister().unwrap();
            sbuf.write_at(0, &[2; 32]).unwrap();
            p.cli.qp.post_send(SendWr { wr_id: 2, ..w }).unwrap();
            assert_eq!(
                ids(&p.cli.poll_n(1)),
                [(2, WcStatus::RemoteAccess)],
                "{t:?}"
            );
            assert_eq!(
                bytes(&tbuf, 0, 32),
                [1; 32],
                "{t:?}: untouched after revocation"
            );
        }
    }

    #[test]
    fn rdma_read_returns_target_memory_and_needs_remote_read() {
        let p = pair(Transport::Shm, QpCaps::default());
        let tbuf = p.srv.buffer(8192, 0x5a);
        let readable = p
            .srv
            .pd
            .reg_mr(&tbuf, 0, 4096, Access::REMOTE_READ)
            .unwrap();
        let writable = p
            .srv
            .pd
            .reg_mr(&tbuf, 4096, 4096, Access::REMOTE_WRITE)
            .unwrap();
        let dbuf = p.cli.buffer(8192, 0);
        let dmr = p
            .cli
            .pd
            .reg_mr(&dbuf, 0, 8192, Access::LOCAL_WRITE)
            .unwrap();
        let read = |id, off, len, remote| wr(id, Opcode::RdmaRead, dmr.sge(off, len), Some(remote));
        for w in [
            read(1, 100, 4000, readable.remote(8)),
            read(2, 0, 16, writable.remote(0)),
            read(3, 0, 16, readable.remote(4090)),
        ] {
            p.cli.qp.post_send(w).unwrap();
        }
        let done = p.cli.poll_n(3);
        assert_eq!(
            ids(&done),
            [
                (1, WcStatus::Success),
                (2, WcStatus::RemoteAccess),
                (3, WcStatus::RemoteAccess),
            ]
        );
        assert_eq!(
            (done[0].opcode, done[0].byte_len),
            (WcOpcode::RdmaRead, 4000)
        );
        assert_eq!(bytes(&dbuf, 100, 4000), vec![0x5a; 4000]);
        assert_eq!(bytes(&dbuf, 0, 100), vec![0; 100]);
        assert_eq!(bytes(&dbuf, 4100, 4092), vec![0; 4092]);
        let (c, s) = (p.cli.qp.stats(), p.srv.qp.stats());
        assert_eq!((c.bytes_in, s.bytes_out), (4000, 4000));
        assert_eq!((s.remote_ops_applied, s.remote_ops_refused), (1, 2));
    }

    #[test]
    fn write_with_imm_consumes_a_receive_and_a_plain_write_does_not() {
        let p = pair(Transport::Shm, QpCaps::default());
        let tbuf = p.srv.buffer(4096, 0);
        let tmr = p
            .srv
            .pd
            .reg_mr(&tbuf, 0, 4096, Access::REMOTE_WRITE | Access::LOCAL_WRITE)
            .unwrap();
        recv(&p, 5, tmr.sge(0, 4096));
        let (_sbuf, smr) = p.cli.region(4096, 4, Access::NONE);
        let plain = wr(1, Opcode::RdmaWrite, smr.sge(0, 10), Some(tmr.remote(0)));
        p.cli.qp.post_send(plain).unwrap();
        assert_eq!(ids(&p.cli.poll_n(1)), [(1, WcStatus::Success)]);
        assert!(p.srv.cq.poll(4).unwrap().is_empty());
        let with_imm = SendWr {
            wr_id: 2,
            opcode: Opcode::RdmaWriteWithImm,
            imm: Some(1234),
            ..plain
        };
        p.cli.qp.post_send(with_imm).unwrap();
        assert_eq!(ids(&p.cli.poll_n(1)), [(2, WcStatus::Success)]);
        let got = poll_n(&p.srv.cq, 1);
        assert_eq!(ids(&got), [(5, WcStatus::Success)]);
        assert_eq!(
            (got[0].opcode, got[0].byte_len, got[0].imm),
            (WcOpcode::RecvRdmaWithImm, 10, Some(1234))
        );
    }
}
