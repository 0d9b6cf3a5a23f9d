//! The connection table: what the relay does with each checked packet.
//!
//! Pure logic, no I/O: [`Table::packet`] takes a header a partition sent
//! (already checked by [`Header::from_guest`], so its source is that
//! partition's CID) and says what to deliver to whom; the caller moves the
//! bytes. Every connection is keyed by its two ends, so one partition
//! cannot act on a connection it is not an end of.
//!
//! Rules:
//! - A REQUEST opens a connection only if the sender is under its
//!   connection limit and the [`Directory`] says the listener accepts the
//!   sender on that port (one lookup per connection, counted); otherwise the
//!   sender gets a RST and the refusal is counted.
//! - Every later packet on a connection updates the credit books of the
//!   direction towards its sender ([`Credit::receiver_update`]); RW is
//!   charged against the direction away from it ([`Credit::send`]). A broken
//!   rule resets the connection at both ends and is counted against the
//!   partition that broke it.
//! - The `buf_alloc` a receiver advertises reaches the sender capped at
//!   [`super::credit::MAX_BUF_ALLOC`].
//! - A packet for no connection is answered with a RST (a RST for no
//!   connection is dropped), as a Linux peer does.
//! - When a partition goes away every connection it was an end of is
//!   dropped and the other ends get a RST ([`Table::partition_gone`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::credit::{Credit, CreditError};
use super::packet::{Addr, Header, Op};

/// Where the directory says a connection request should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A partition on this host whose definition accepts the sender on that
    /// port.
    Local,
    /// Refused, and why.
    Refused(Refusal),
}

/// Why a connection request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the listener's definition does not accept this partition on that port")]
    NotAccepted,
    #[error("no partition has that CID")]
    UnknownCid,
    #[error(
        "the CID belongs to a partition on another host, which this part-io does not reach yet"
    )]
    Remote,
    #[error("the sender has reached its connection limit")]
    Limit,
    #[error("a partition cannot connect to itself through part-io")]
    Loopback,
}

/// The policy and location service (partd's directory).
pub trait Directory {
    /// May `from_cid` connect to `to`, and where is it?
    fn lookup(&self, from_cid: u64, to: Addr) -> Lookup;
}

/// What the relay must do with one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Deliver `header` (and for RW the sender's payload) to partition `to`.
    Forward { to: u64, header: Header },
    /// Deliver `header` (a RST, no payload) to partition `to`.
    Reset { to: u64, header: Header },
}

/// What a partition did wrong or was refused; counted per partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A connection request was refused.
    Refused(Refusal),
    /// A credit rule was broken by this partition.
    Credit(CreditError),
    /// A packet made no sense for its connection's state (e.g. RW before
    /// the RESPONSE, a second REQUEST for an open connection).
    Protocol,
    /// A packet for no connection.
    NoConnection,
}

/// The result of one packet: the actions and, if any, what to count
/// against the sender.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub actions: Vec<Action>,
    pub event: Option<Event>,
    /// True when the packet's payload is to be delivered (the one RW
    /// forward); false means the caller discards it.
    pub deliver_payload: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// REQUEST forwarded, no RESPONSE yet.
    Connecting,
    Established,
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    state: State,
    /// When the REQUEST went through.
    opened: Instant,
    /// Data from the initiator to the listener.
    to_listener: Credit,
    /// Data from the listener to the initiator.
    to_initiator: Credit,
}

/// How long a listener has to answer a REQUEST before part-io resets the
/// connection: a listener that never answers must not use up its callers'
/// connection limits. (Linux gives up on its side after 2 s.)
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Key: (initiator, listener).
type Key = (Addr, Addr);

/// Per-partition counters of the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounters {
    pub lookups: u64,
    pub refused: u64,
    pub credit_violations: u64,
    pub protocol_errors: u64,
    pub no_connection: u64,
    pub open: u64,
}

/// Every relayed connection of one part-io vsock.
pub struct Table {
    conns: HashMap<Key, Conn>,
    limit: usize,
    counters: HashMap<u64, TableCounters>,
}

impl Table {
    /// A table allowing each partition to have initiated `limit` open or
    /// opening connections. Only initiated ones count: otherwise a flood of
    /// requests to a partition would use up the limit of its victim.
    pub fn new(limit: usize) -> Table {
        Table {
            conns: HashMap::new(),
            limit,
            counters: HashMap::new(),
        }
    }

    /// The counters of partition `cid`.
    pub fn counters(&self, cid: u64) -> TableCounters {
        let mut c = self.counters.get(&cid).copied().unwrap_or_default();
        c.open = self.open_of(cid) as u64;
        c
    }

    /// Connections `cid` is an end of.
    fn open_of(&self, cid: u64) -> usize {
        self.conns
            .keys()
            .filter(|(i, l)| i.cid == cid || l.cid == cid)
            .count()
    }

    fn count(&mut self, cid: u64, event: Event) {
        let c = self.counters.entry(cid).or_default();
        match event {
            Event::Refused(_) => c.refused += 1,
            Event::Credit(_) => c.credit_violations += 1,
            Event::Protocol => c.protocol_errors += 1,
            Event::NoConnection => c.no_connection += 1,
        }
    }

    /// What to do with `h`, sent by partition `h.src.cid`.
    pub fn packet(&mut self, h: &Header, dir: &dyn Directory) -> Outcome {
        let from = h.src.cid;
        let out = if h.op == Op::Request {
            self.request(h, dir)
        } else if let Some(conn) = self.conns.get(&(h.src, h.dst)).copied() {
            // The sender opened this connection.
            self.on_conn((h.src, h.dst), conn, h, true)
        } else if let Some(conn) = self.conns.get(&(h.dst, h.src)).copied() {
            self.on_conn((h.dst, h.src), conn, h, false)
        } else if h.op == Op::Rst {
            Outcome::default()
        } else {
            refuse(h, Event::NoConnection)
        };
        if let Some(e) = out.event {
            self.count(from, e);
        }
        out
    }

    fn request(&mut self, h: &Header, dir: &dyn Directory) -> Outcome {
        let key = (h.src, h.dst);
        if self.conns.contains_key(&key) || self.conns.contains_key(&(h.dst, h.src)) {
            // A second REQUEST for a live connection: both ends lose it.
            return self.reset_both(key, h, Event::Protocol);
        }
        if h.dst.cid == h.src.cid {
            return refuse(h, Event::Refused(Refusal::Loopback));
        }
        let initiated = self
            .conns
            .keys()
            .filter(|(i, _)| i.cid == h.src.cid)
            .count();
        if initiated >= self.limit {
            return refuse(h, Event::Refused(Refusal::Limit));
        }
        self.counters.entry(h.src.cid).or_default().lookups += 1;
        match dir.lookup(h.src.cid, h.dst) {
            Lookup::Refused(r) => refuse(h, Event::Refused(r)),
            Lookup::Local => {
                let mut conn = Conn {
                    state: State::Connecting,
                    opened: Instant::now(),
                    to_listener: Credit::default(),
                    to_initiator: Credit::default(),
                };
                let Ok(shown) = conn.to_initiator.receiver_update(h.buf_alloc, h.fwd_cnt) else {
                    return refuse(h, Event::Protocol);
                };
                self.conns.insert(key, conn);
                forward(h, shown, false)
            }
        }
    }

    fn on_conn(&mut self, key: Key, mut conn: Conn, h: &Header, initiator: bool) -> Outcome {
        if h.op == Op::Rst {
            self.conns.remove(&key);
            return forward(h, h.buf_alloc, false);
        }
        let (towards_sender, away) = if initiator {
            (&mut conn.to_initiator, &mut conn.to_listener)
        } else {
            (&mut conn.to_listener, &mut conn.to_initiator)
        };
        let shown = match towards_sender.receiver_update(h.buf_alloc, h.fwd_cnt) {
            Ok(v) => v,
            Err(e) => return self.reset_both(key, h, Event::Credit(e)),
        };
        match (h.op, conn.state) {
            (Op::Response, State::Connecting) if !initiator => conn.state = State::Established,
            (Op::Response, _) => return self.reset_both(key, h, Event::Protocol),
            (Op::Rw, State::Established) => {
                if let Err(e) = away.send(h.len) {
                    return self.reset_both(key, h, Event::Credit(e));
                }
            }
            (_, State::Connecting) => return self.reset_both(key, h, Event::Protocol),
            (Op::Shutdown | Op::CreditUpdate | Op::CreditRequest, State::Established) => {}
            (Op::Request | Op::Rst, _) => return self.reset_both(key, h, Event::Protocol),
        }
        self.conns.insert(key, conn);
        forward(h, shown, h.op == Op::Rw)
    }

    /// Drops the connection and sends a RST to each end.
    fn reset_both(&mut self, key: Key, h: &Header, event: Event) -> Outcome {
        self.conns.remove(&key);
        Outcome {
            actions: vec![
                Action::Reset {
                    to: h.src.cid,
                    header: h.reset_reply(),
                },
                Action::Reset {
                    to: h.dst.cid,
                    header: Header::control(Op::Rst, h.src, h.dst),
                },
            ],
            event: Some(event),
            deliver_payload: false,
        }
    }

    /// Resets every connection whose listener has not answered its REQUEST
    /// within [`CONNECT_TIMEOUT`] of `now`; returns the RSTs for both ends.
    pub fn expire(&mut self, now: Instant) -> Vec<Action> {
        let stale: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Connecting && now.duration_since(c.opened) >= CONNECT_TIMEOUT
            })
            .map(|(k, _)| *k)
            .collect();
        stale
            .into_iter()
            .flat_map(|(i, l)| {
                self.conns.remove(&(i, l));
                [
                    Action::Reset {
                        to: i.cid,
                        header: Header::control(Op::Rst, l, i),
                    },
                    Action::Reset {
                        to: l.cid,
                        header: Header::control(Op::Rst, i, l),
                    },
                ]
            })
            .collect()
    }

    /// `h` was to be forwarded but its receiver cannot take packets (no
    /// receive queue yet): the connection, if any, is dropped and the
    /// sender gets a RST.
    pub fn undeliverable(&mut self, h: &Header) -> Action {
        self.conns.remove(&(h.src, h.dst));
        self.conns.remove(&(h.dst, h.src));
        Action::Reset {
            to: h.src.cid,
            header: h.reset_reply(),
        }
    }

    /// Drops every connection partition `cid` was an end of; returns the
    /// RSTs for the other ends. Its counters stay (they are per port, for
    /// the life of the process, as the switch's).
    pub fn partition_gone(&mut self, cid: u64) -> Vec<Action> {
        let gone: Vec<Key> = self
            .conns
            .keys()
            .filter(|(i, l)| i.cid == cid || l.cid == cid)
            .copied()
            .collect();
        gone.into_iter()
            .filter_map(|(i, l)| {
                self.conns.remove(&(i, l));
                let (gone_end, other) = if i.cid == cid { (i, l) } else { (l, i) };
                // A partition connected to itself has no other end left.
                (other.cid != cid).then(|| Action::Reset {
                    to: other.cid,
                    header: Header::control(Op::Rst, gone_end, other),
                })
            })
            .collect()
    }
}

/// A RST back to the sender.
fn refuse(h: &Header, event: Event) -> Outcome {
    Outcome {
        actions: vec![Action::Reset {
            to: h.src.cid,
            header: h.reset_reply(),
        }],
        event: Some(event),
        deliver_payload: false,
    }
}

/// `h` on to its destination, showing `buf_alloc` as the sender's buffer.
fn forward(h: &Header, buf_alloc: u32, payload: bool) -> Outcome {
    let mut header = *h;
    header.buf_alloc = buf_alloc;
    Outcome {
        actions: vec![Action::Forward {
            to: h.dst.cid,
            header,
        }],
        event: None,
        deliver_payload: payload,
    }
}

#[cfg(test)]
mod tests {
    use super::super::credit::MAX_BUF_ALLOC;
    use super::super::packet::TYPE_STREAM;
    use super::*;
    use std::cell::Cell;

    /// CID 4 accepts CID 3 on port 80; CID 9 is remote; others unknown.
    #[derive(Default)]
    struct Dir {
        calls: Cell<u32>,
    }
    impl Directory for Dir {
        fn lookup(&self, from: u64, to: Addr) -> Lookup {
            self.calls.set(self.calls.get() + 1);
            match (from, to.cid, to.port) {
                (3, 4, 80) | (5, 4, 80) => Lookup::Local,
                (_, 4, _) => Lookup::Refused(Refusal::NotAccepted),
                (_, 9, _) => Lookup::Refused(Refusal::Remote),
                _ => Lookup::Refused(Refusal::UnknownCid),
            }
        }
    }

    const A: Addr = Addr { cid: 3, port: 1025 };
    const B: Addr = Addr { cid: 4, port: 80 };

    fn pkt(op: Op, src: Addr, dst: Addr, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src,
            dst,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// A connection A -> B with both buffers at 1000 bytes.
    fn open(t: &mut Table, dir: &Dir) {
        let o = t.packet(&pkt(Op::Request, A, B, 0, 1000, 0), dir);
        assert_eq!(o.event, None);
        let o = t.packet(&pkt(Op::Response, B, A, 0, 1000, 0), dir);
        assert_eq!(o.event, None);
    }

    fn resets(o: &Outcome) -> Vec<u64> {
        o.actions
            .iter()
            .filter_map(|a| match a {
                Action::Reset { to, header } => {
                    assert_eq!(header.op, Op::Rst);
                    Some(*to)
                }
                Action::Forward { .. } => None,
            })
            .collect()
    }

    #[test]
    fn an_accepted_request_is_forwarded_after_one_lookup_and_data_flows_both_ways() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        let o = t.packet(&pkt(Op::Request, A, B, 0, 1000, 0), &dir);
        assert_eq!(
            o.actions,
            vec![Action::Forward {
                to: 4,
                header: pkt(Op::Request, A, B, 0, 1000, 0)
            }]
        );
        t.packet(&pkt(Op::Response, B, A, 0, 500, 0), &dir);
        let o = t.packet(&pkt(Op::Rw, A, B, 500, 1000, 0), &dir);
        assert!(o.deliver_payload && o.event.is_none());
        let o = t.packet(&pkt(Op::Rw, B, A, 1000, 500, 0), &dir);
        assert!(o.deliver_payload && o.event.is_none());
        assert_eq!(dir.calls.get(), 1, "one directory lookup per connection");
        assert_eq!(t.counters(3).lookups, 1);
        assert_eq!((t.counters(3).open, t.counters(4).open), (1, 1));
    }

    #[test]
    fn refused_requests_get_a_reset_and_are_counted_for_the_sender() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        for (dst, why) in [
            (Addr { cid: 4, port: 81 }, Refusal::NotAccepted),
            (Addr { cid: 9, port: 80 }, Refusal::Remote),
            (Addr { cid: 7, port: 80 }, Refusal::UnknownCid),
            (Addr { cid: 3, port: 80 }, Refusal::Loopback),
        ] {
            let o = t.packet(&pkt(Op::Request, A, dst, 0, 1000, 0), &dir);
            assert_eq!(o.event, Some(Event::Refused(why)));
            assert_eq!(resets(&o), vec![3]);
        }
        assert_eq!(t.counters(3).refused, 4);
        assert_eq!(t.counters(3).open, 0);
        assert_eq!(t.counters(4), TableCounters::default());
    }

    #[test]
    fn a_request_flood_stops_at_the_connection_limit_and_costs_only_the_flooder() {
        let (mut t, dir) = (Table::new(4), Dir::default());
        for port in 0..10 {
            t.packet(
                &pkt(Op::Request, Addr { cid: 3, port }, B, 0, 1000, 0),
                &dir,
            );
        }
        assert_eq!(t.counters(3).open, 4);
        assert_eq!(t.counters(3).refused, 6);
        assert_eq!(dir.calls.get(), 4, "refused at the limit before any lookup");
        // Another partition still reaches the same listener: the limit is
        // the flooder's, not the listener's.
        let c = Addr { cid: 5, port: 1 };
        let o = t.packet(&pkt(Op::Request, c, B, 0, 1000, 0), &dir);
        assert_eq!(o.event, None);
        assert_eq!(t.counters(5).refused, 0);
        // And the flooded listener can still connect out.
        let o = t.packet(
            &pkt(
                Op::Request,
                Addr { cid: 4, port: 2 },
                Addr { cid: 5, port: 80 },
                0,
                1000,
                0,
            ),
            &dir,
        );
        // (past the limit check, refused only by the directory)
        assert_eq!(o.event, Some(Event::Refused(Refusal::UnknownCid)));
    }

    #[test]
    fn a_credit_liar_loses_its_connection_and_is_counted() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        open(&mut t, &dir);
        t.packet(&pkt(Op::Rw, A, B, 600, 1000, 0), &dir);
        let o = t.packet(&pkt(Op::Rw, A, B, 401, 1000, 0), &dir);
        assert_eq!(
            o.event,
            Some(Event::Credit(CreditError::Exceeded {
                len: 401,
                free: 400
            }))
        );
        assert!(!o.deliver_payload);
        assert_eq!(resets(&o), vec![3, 4]);
        assert_eq!(t.counters(3).credit_violations, 1);
        assert_eq!(t.counters(3).open, 0);
        // A receiver inflating its fwd_cnt is the liar in the other direction.
        open(&mut t, &dir);
        t.packet(&pkt(Op::Rw, A, B, 10, 1000, 0), &dir);
        let o = t.packet(&pkt(Op::CreditUpdate, B, A, 0, 1000, 11), &dir);
        assert!(matches!(
            o.event,
            Some(Event::Credit(CreditError::FwdAhead { .. }))
        ));
        assert_eq!(t.counters(4).credit_violations, 1);
    }

    #[test]
    fn out_of_state_packets_reset_and_strangers_get_a_reset() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        t.packet(&pkt(Op::Request, A, B, 0, 1000, 0), &dir);
        // Data before the RESPONSE.
        let o = t.packet(&pkt(Op::Rw, A, B, 1, 1000, 0), &dir);
        assert_eq!(o.event, Some(Event::Protocol));
        // The initiator cannot answer its own request.
        t.packet(&pkt(Op::Request, A, B, 0, 1000, 0), &dir);
        let o = t.packet(&pkt(Op::Response, A, B, 0, 1000, 0), &dir);
        assert_eq!(o.event, Some(Event::Protocol));
        // A packet for no connection, from a partition that guessed ports.
        let o = t.packet(&pkt(Op::Rw, Addr { cid: 5, port: 7 }, B, 1, 1000, 0), &dir);
        assert_eq!(o.event, Some(Event::NoConnection));
        assert_eq!(resets(&o), vec![5]);
        let o = t.packet(&pkt(Op::Rst, Addr { cid: 5, port: 7 }, B, 0, 0, 0), &dir);
        assert_eq!(o, Outcome::default(), "a stray RST is dropped");
    }

    #[test]
    fn advertised_buffers_reach_the_peer_capped() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        let o = t.packet(&pkt(Op::Request, A, B, 0, u32::MAX, 0), &dir);
        let Action::Forward { header, .. } = o.actions[0] else {
            panic!("{o:?}")
        };
        assert_eq!(header.buf_alloc, MAX_BUF_ALLOC);
    }

    #[test]
    fn a_partition_going_away_resets_its_peers_only() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        open(&mut t, &dir);
        let c = Addr { cid: 5, port: 9 };
        t.packet(&pkt(Op::Request, c, B, 0, 1000, 0), &dir);
        let rsts = t.partition_gone(4);
        let mut to: Vec<u64> = rsts
            .iter()
            .map(|a| match a {
                Action::Reset { to, header } => {
                    assert_eq!((header.op, header.src.cid), (Op::Rst, 4));
                    *to
                }
                Action::Forward { .. } => panic!("{a:?}"),
            })
            .collect();
        to.sort();
        assert_eq!(to, vec![3, 5]);
        assert_eq!((t.counters(3).open, t.counters(5).open), (0, 0));
        let o = t.packet(&pkt(Op::Rw, A, B, 1, 1000, 0), &dir);
        assert_eq!(o.event, Some(Event::NoConnection));
    }

    #[test]
    fn a_listener_that_never_answers_has_its_pending_connections_reset() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        t.packet(&pkt(Op::Request, A, B, 0, 1000, 0), &dir);
        assert!(t.expire(Instant::now()).is_empty(), "not yet");
        let later = Instant::now() + CONNECT_TIMEOUT;
        let to: Vec<u64> = t
            .expire(later)
            .iter()
            .map(|a| match a {
                Action::Reset { to, .. } => *to,
                Action::Forward { .. } => panic!("{a:?}"),
            })
            .collect();
        assert_eq!(to, vec![3, 4]);
        assert_eq!(t.counters(3).open, 0);
        // An established connection is not expired.
        open(&mut t, &dir);
        assert!(t.expire(later + CONNECT_TIMEOUT).is_empty());
    }

    #[test]
    fn an_undeliverable_request_leaves_no_connection_behind() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        let h = pkt(Op::Request, A, B, 0, 1000, 0);
        t.packet(&h, &dir);
        let a = t.undeliverable(&h);
        assert!(matches!(a, Action::Reset { to: 3, .. }));
        assert_eq!(t.counters(3).open, 0);
    }

    #[test]
    fn a_reset_closes_the_connection_at_both_ends() {
        let (mut t, dir) = (Table::new(8), Dir::default());
        open(&mut t, &dir);
        let o = t.packet(&pkt(Op::Rst, B, A, 0, 0, 0), &dir);
        assert!(matches!(o.actions[..], [Action::Forward { to: 3, .. }]));
        assert_eq!(t.counters(3).open, 0);
    }
}
