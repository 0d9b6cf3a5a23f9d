//! TCP transport: the same messages as shm, with payloads inline on the
//! stream. The socket is non-blocking and read by whoever drives progress
//! (the polling application or the QP's engine thread): no reader thread,
//! no hand-off. The target's progress engine applies RDMA writes and reads
//! exactly as for shm.
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use channels::Doorbell;

use crate::connect::{admit, Admission, Challenge, Hello, Intro, Reply};
use crate::deframe::Deframer;
use crate::link::{InData, Link, LinkEvent, OutData};
use crate::proof::Nonce;
use crate::types::Transport;
use crate::wire::{Kind, Msg, MSG_LEN, RESP_WITH_DATA};
use crate::{IcError, Result};

/// Payload bytes we buffer while our own send is blocked, before calling the
/// peer hostile.
const PENDING_CAP: u64 = 256 << 20;
/// How long a send may stay blocked on a peer that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct TcpLink {
    stream: TcpStream,
    deframe: Deframer,
    /// Events read while a send was blocked (so two peers sending to each
    /// other never deadlock).
    pending: VecDeque<LinkEvent>,
    pending_bytes: u64,
    /// Never rung by the peer: the first wait fd must be an eventfd.
    idle_bell: Doorbell,
    closed: bool,
}

enum ReadOutcome {
    Progress,
    WouldBlock,
    End(LinkEvent),
}

fn write_frame(s: &mut TcpStream, b: &[u8]) -> Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| IcError::Protocol("frame too large".into()))?;
    s.write_all(&len.to_le_bytes())
        .and_then(|_| s.write_all(b))
        .map_err(|e| IcError::io("tcp handshake write", e))
}

fn read_frame(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut l = [0u8; 4];
    s.read_exact(&mut l)
        .map_err(|e| IcError::io("tcp handshake read", e))?;
    let len = u32::from_le_bytes(l) as usize;
    if len > 4096 {
        return Err(IcError::Protocol("handshake frame too large".into()));
    }
    let mut v = vec![0u8; len];
    s.read_exact(&mut v)
        .map_err(|e| IcError::io("tcp handshake read", e))?;
    Ok(v)
}

fn start(stream: TcpStream) -> Result<TcpLink> {
    stream
        .set_nodelay(true)
        .map_err(|e| IcError::io("TCP_NODELAY", e))?;
    stream
        .set_read_timeout(None)
        .map_err(|e| IcError::io("set_read_timeout", e))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| IcError::io("set_nonblocking", e))?;
    Ok(TcpLink {
        stream,
        deframe: Deframer::new(),
        pending: VecDeque::new(),
        pending_bytes: 0,
        idle_bell: Doorbell::new()?,
        closed: false,
    })
}

pub(crate) fn connect(addr: SocketAddr, intro: &Intro<'_>, timeout: Duration) -> Result<TcpLink> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| IcError::io(format!("connect {addr}"), e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| IcError::io("set_read_timeout", e))?;
    let challenge: Challenge = serde_json::from_slice(&read_frame(&mut s)?)
        .map_err(|e| IcError::Protocol(format!("bad challenge: {e}")))?;
    write_frame(
        &mut s,
        &serde_json::to_vec(&intro.answer(&challenge))
            .map_err(|e| IcError::Protocol(e.to_string()))?,
    )?;
    let reply: Reply = serde_json::from_slice(&read_frame(&mut s)?)
        .map_err(|e| IcError::Protocol(format!("bad reply: {e}")))?;
    if !reply.ok {
        return Err(IcError::Refused(reply.reason));
    }
    start(s)
}

pub(crate) fn accept(mut s: TcpStream, a: &Admission<'_>) -> Result<(TcpLink, String)> {
    s.set_nonblocking(false)
        .map_err(|e| IcError::io("set_nonblocking", e))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| IcError::io("set_read_timeout", e))?;
    let nonce = Nonce::generate()?;
    write_frame(
        &mut s,
        &serde_json::to_vec(&Challenge { nonce }).map_err(|e| IcError::Protocol(e.to_string()))?,
    )?;
    let hello: Hello = serde_json::from_slice(&read_frame(&mut s)?)
        .map_err(|e| IcError::Protocol(format!("bad hello: {e}")))?;
    let ok = admit(&hello, &nonce, a, Transport::Tcp);
    let reply = Reply {
        ok: ok.is_ok(),
        reason: ok.clone().err().unwrap_or_default(),
    };
    write_frame(
        &mut s,
        &serde_json::to_vec(&reply).map_err(|e| IcError::Protocol(e.to_string()))?,
    )?;
    if let Err(r) = ok {
        return Err(IcError::Refused(r));
    }
    Ok((start(s)?, hello.from))
}

impl TcpLink {
    /// One non-blocking read into the deframer.
    fn read_more(&mut self) -> ReadOutcome {
        let stream = &mut self.stream;
        match self.deframe.fill(|b| stream.read(b)) {
            Ok(n) if n > 0 => ReadOutcome::Progress,
            Ok(_) => ReadOutcome::End(LinkEvent::Lost(
                "peer hung up without closing (process died?)".into(),
            )),
            Err(e) if e.kind() == ErrorKind::WouldBlock => ReadOutcome::WouldBlock,
            Err(e) if e.kind() == ErrorKind::Interrupted => ReadOutcome::Progress,
            Err(e) => ReadOutcome::End(LinkEvent::Lost(format!("connection broken: {e}"))),
        }
    }

    fn next_event(&mut self) -> Option<LinkEvent> {
        loop {
            if let Some(ev) = self.deframe.parse_one() {
                return Some(ev);
            }
            match self.read_more() {
                ReadOutcome::Progress => continue,
                ReadOutcome::WouldBlock => return None,
                ReadOutcome::End(ev) => return Some(ev),
            }
        }
    }

    /// While our write is blocked, keep reading so the peer's write can finish.
    fn absorb_incoming(&mut self) -> std::result::Result<(), String> {
        while let Some(ev) = self.next_event() {
            if let LinkEvent::Msg(_, InData::Bytes(v)) = &ev {
                self.pending_bytes += v.len() as u64;
            }
            let end = !matches!(ev, LinkEvent::Msg(..));
            self.pending.push_back(ev);
            if end {
                break;
            }
            if self.pending_bytes > PENDING_CAP {
                return Err("peer floods us while not reading".into());
            }
        }
        Ok(())
    }

    fn write_all_nb(&mut self, mut b: &[u8]) -> std::result::Result<(), String> {
        let start = Instant::now();
        while !b.is_empty() {
            match self.stream.write(b) {
                Ok(0) => return Err("tcp write returned 0".into()),
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.absorb_incoming()?;
                    if start.elapsed() > SEND_TIMEOUT {
                        return Err("peer stopped reading".into());
                    }
                    let mut p = libc::pollfd {
                        fd: self.stream.as_raw_fd(),
                        events: libc::POLLOUT | libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 10) };
                }
                Err(e) => return Err(format!("tcp write: {e}")),
            }
        }
        Ok(())
    }
}

impl Link for TcpLink {
    fn transport(&self) -> Transport {
        Transport::Tcp
    }

    fn send(&mut self, mut msg: Msg, data: OutData<'_>) -> std::result::Result<(), String> {
        if self.closed {
            return Err("link closed".into());
        }
        let (map, off, len) = match data {
            OutData::None => (None, 0, 0),
            OutData::Source { buf, off, len } => (Some(buf.map()), off, len),
            OutData::ReadData { map, off, len } => {
                msg.src_id = RESP_WITH_DATA;
                (Some(map), off, len)
            }
        };
        if map.is_some() {
            msg.len = len;
        }
        let h = msg.encode();
        match map {
            None => self.write_all_nb(&h),
            Some(map) => {
                if !map.check_range(off, len) {
                    return Err("source outside buffer".into());
                }
                // SAFETY: the range is inside the mapping (checked above) and
                // the mapping outlives this call; the bytes are only read.
                let payload = unsafe {
                    std::slice::from_raw_parts(map.as_ptr().add(off as usize), len as usize)
                };
                if len <= 16 * 1024 {
                    let mut v = Vec::with_capacity(MSG_LEN + payload.len());
                    v.extend_from_slice(&h);
                    v.extend_from_slice(payload);
                    self.write_all_nb(&v)
                } else {
                    self.write_all_nb(&h)?;
                    self.write_all_nb(payload)
                }
            }
        }
    }

    fn try_recv(&mut self) -> Option<LinkEvent> {
        if let Some(ev) = self.pending.pop_front() {
            match &ev {
                LinkEvent::Msg(_, InData::Bytes(v)) => self.pending_bytes -= v.len() as u64,
                LinkEvent::Msg(..) => {}
                LinkEvent::Closed | LinkEvent::Lost(_) => self.closed = true,
            }
            return Some(ev);
        }
        if self.closed {
            return None;
        }
        let ev = self.next_event();
        if matches!(ev, Some(LinkEvent::Closed | LinkEvent::Lost(_))) {
            self.closed = true;
        }
        ev
    }

    fn read_window_free(&self) -> bool {
        true
    }

    fn read_done(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn arm(&self, _sleeping: bool) {}

    fn wait_fds(&self) -> Vec<RawFd> {
        vec![self.idle_bell.fd().as_raw_fd(), self.stream.as_raw_fd()]
    }

    fn close(&mut self) {
        if !self.closed {
            let _ = self.write_all_nb(&Msg::new(Kind::Close, 0).encode());
        }
        self.closed = true;
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
