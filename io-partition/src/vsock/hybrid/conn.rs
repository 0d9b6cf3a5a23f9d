//! One hybrid connection: a guest socket on one end, a host process's Unix
//! stream on the other, with part-io as the vsock end towards the guest.
//!
//! Two threads move its bytes, so that neither a slow host process nor a
//! guest out of credit ever blocks the guest's transmit queue:
//! - the *reader* reads the host stream, never more than the guest's
//!   credit allows, and delivers RW packets to the guest;
//! - the *writer* drains what the guest sent (at most [`HOST_BUF`] bytes,
//!   the `buf_alloc` part-io advertises) into the host stream, and tells
//!   the guest with a CREDIT_UPDATE when the guest may be short of room.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use partvisor_runtime::sync::{CondvarExt, MutexExt};

use super::super::credit::Credit;
use super::super::packet::{Addr, Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::super::relay::{Payload, Relay, VsockPort};

/// The receive buffer part-io advertises for a hybrid connection: what the
/// guest may have sent and the host process not yet read.
pub const HOST_BUF: u32 = 256 * 1024;
/// part-io tells the guest its new `fwd_cnt` when the guest believes it has
/// less than this much room left (one full packet).
const UPDATE_BELOW: u32 = 64 * 1024;
/// Largest read from a host stream (one RW packet).
const READ_CHUNK: usize = 64 * 1024;

/// Where a hybrid connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the other side's answer (a RESPONSE from the guest, or
    /// the connect to the host listener).
    Connecting,
    Open,
    Closed,
}

/// What both threads and the guest's packets share.
pub struct State {
    pub phase: Phase,
    /// Host -> guest: the guest's credit books.
    pub to_guest: Credit,
    /// Guest -> host: what the guest sent and the host has not read yet.
    pub to_host: Vec<u8>,
    /// Guest -> host: our books (relayed = received from the guest,
    /// fwd_cnt = written to the host stream).
    pub from_guest: Credit,
    /// `fwd_cnt` last told to the guest.
    pub fwd_told: u32,
    /// The guest will send no more (SHUTDOWN with SEND).
    pub guest_done_sending: bool,
    /// The guest closed its socket (SHUTDOWN with both flags): once what
    /// it sent is written, it gets the RST that ends the connection.
    pub guest_closing: bool,
    /// The guest reset the connection: nothing more goes to it; what it
    /// sent before is still written to the host process, then the
    /// connection closes.
    pub guest_reset: bool,
}

impl State {
    /// Whether nothing may be sent to the guest any more.
    pub fn guest_gone(&self) -> bool {
        self.phase == Phase::Closed || self.guest_reset
    }
}

/// One hybrid connection.
pub struct HostConn {
    /// The guest's end.
    pub guest: Addr,
    /// The host's end (CID 2 and the port the guest sees).
    pub host: Addr,
    /// Opened by a host process (the guest answers with RESPONSE), not by
    /// the guest.
    pub host_initiated: bool,
    pub state: Mutex<State>,
    pub changed: Condvar,
    stream: Mutex<Option<UnixStream>>,
    /// Held from taking a header's `fwd_cnt` to its delivery, so the guest
    /// never sees `fwd_cnt` go back (both threads send to the guest).
    order: Mutex<()>,
}

impl HostConn {
    /// A connection between `guest` and host port `host_port`, not yet open.
    pub fn new(guest: Addr, host_port: u32, host_initiated: bool) -> Arc<HostConn> {
        let mut from_guest = Credit::default();
        // Our receive buffer is fixed; the guest's first packet brings its own.
        let _ = from_guest.receiver_update(HOST_BUF, 0);
        Arc::new(HostConn {
            guest,
            host: Addr {
                cid: HOST_CID,
                port: host_port,
            },
            host_initiated,
            state: Mutex::new(State {
                phase: Phase::Connecting,
                to_guest: Credit::default(),
                to_host: Vec::new(),
                from_guest,
                fwd_told: 0,
                guest_done_sending: false,
                guest_closing: false,
                guest_reset: false,
            }),
            changed: Condvar::new(),
            stream: Mutex::new(None),
            order: Mutex::new(()),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    /// The header of a packet from the host end to the guest, with our
    /// credit in it.
    pub fn header(&self, op: Op, s: &State) -> Header {
        let mut h = Header::control(op, self.host, self.guest);
        h.buf_alloc = HOST_BUF;
        h.fwd_cnt = s.from_guest.fwd_cnt();
        h
    }

    /// Sends a packet without payload to the guest.
    pub fn tell(&self, relay: &Relay, port: &VsockPort, op: Op, flags: u32) -> bool {
        let _order = self.order.locked();
        let mut h = {
            let mut s = self.lock();
            let h = self.header(op, &s);
            s.fwd_told = h.fwd_cnt;
            h
        };
        h.flags = flags;
        relay.deliver(port, &h, Payload::None)
    }

    /// The stream is connected and the connection open, unless it was
    /// closed in the meantime (then the stream is dropped: false).
    pub fn open_with(&self, stream: UnixStream) -> bool {
        let mut s = self.lock();
        if s.phase == Phase::Closed {
            return false;
        }
        *self.stream.locked() = Some(stream);
        s.phase = Phase::Open;
        drop(s);
        self.changed.notify_all();
        true
    }

    /// Ends the connection here: no more bytes either way, both threads
    /// wake and end, the host stream is shut down.
    pub fn close(&self) {
        self.lock().phase = Phase::Closed;
        self.changed.notify_all();
        if let Some(s) = self.stream.locked().as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Bounds every further write to the host stream by `timeout` (a
    /// socket option: it holds for the writer's clone too).
    pub fn limit_drain(&self, timeout: Duration) {
        if let Some(s) = self.stream.locked().as_ref() {
            let _ = s.set_write_timeout(Some(timeout));
        }
    }

    fn clone_stream(&self) -> Option<UnixStream> {
        self.stream
            .locked()
            .as_ref()
            .and_then(|s| s.try_clone().ok())
    }
}

/// Host stream -> guest, within the guest's credit. Ends at EOF (the guest
/// gets a SHUTDOWN), on an error or when the connection closes.
pub fn read_loop(conn: &Arc<HostConn>, relay: &Relay, port: &Arc<VsockPort>) {
    let Some(mut stream) = conn.clone_stream() else {
        return;
    };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let room = {
            let mut s = conn.lock();
            loop {
                if s.guest_gone() {
                    return;
                }
                let free = s.to_guest.free() as usize;
                if free > 0 {
                    break free.min(READ_CHUNK);
                }
                s = conn.changed.wait_locked(s);
            }
        };
        let n = match stream.read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                // The host process closed its end (or the connection was
                // closed here): the guest hears it as a full shutdown.
                if !conn.lock().guest_gone() {
                    conn.tell(relay, port, Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND);
                }
                return;
            }
            Ok(n) => n,
        };
        let order = conn.order.locked();
        let h = {
            let mut s = conn.lock();
            if s.guest_gone() || s.to_guest.send(n as u32).is_err() {
                return;
            }
            let mut h = conn.header(Op::Rw, &s);
            h.len = n as u32;
            s.fwd_told = h.fwd_cnt;
            h
        };
        let delivered = relay.deliver(port, &h, Payload::Bytes(&buf[..n]));
        drop(order);
        if !delivered {
            conn.close();
            return;
        }
        port.stats
            .host_to_guest_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What the guest sent -> host stream; tells the guest its new `fwd_cnt`
/// as the host reads. Ends when the connection closes or the stream fails
/// (the guest gets a RST).
pub fn write_loop(conn: &Arc<HostConn>, relay: &Relay, port: &Arc<VsockPort>) {
    let Some(mut stream) = conn.clone_stream() else {
        return;
    };
    let mut chunk = Vec::new();
    let mut shut = false;
    loop {
        {
            let mut s = conn.lock();
            loop {
                if s.phase == Phase::Closed {
                    return;
                }
                if !s.to_host.is_empty() {
                    break;
                }
                if s.guest_reset {
                    drop(s);
                    conn.close();
                    return;
                }
                if s.guest_closing {
                    drop(s);
                    conn.tell(relay, port, Op::Rst, 0);
                    conn.close();
                    return;
                }
                if s.guest_done_sending && !shut {
                    let _ = stream.shutdown(Shutdown::Write);
                    shut = true;
                }
                s = conn
                    .changed
                    .wait_timeout_locked(s, Duration::from_secs(1))
                    .0;
            }
            std::mem::swap(&mut chunk, &mut s.to_host);
        }
        if stream.write_all(&chunk).is_err() {
            // The host process went (or part-io closed the connection).
            if !conn.lock().guest_gone() {
                conn.close();
                conn.tell(relay, port, Op::Rst, 0);
            }
            return;
        }
        port.stats
            .guest_to_host_bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let n = chunk.len() as u32;
        chunk.clear();
        let update = {
            let mut s = conn.lock();
            let fwd = s.from_guest.fwd_cnt().wrapping_add(n);
            let _ = s.from_guest.receiver_update(HOST_BUF, fwd);
            // As Linux does: tell the guest only when the space it believes
            // it has (what it last heard of our fwd_cnt) is under one full
            // packet, so it may be waiting. Every packet part-io sends it
            // carries fwd_cnt too. An update per write would wake a guest
            // waiting for an answer once more per round trip.
            let believed_in_flight = s
                .from_guest
                .in_flight()
                .wrapping_add(fwd.wrapping_sub(s.fwd_told));
            !s.guest_gone()
                && fwd != s.fwd_told
                && HOST_BUF.saturating_sub(believed_in_flight) < UPDATE_BELOW
        };
        if update {
            conn.tell(relay, port, Op::CreditUpdate, 0);
        }
    }
}
