//! TCP transport: the same messages as shm, with payloads inline on the
//! stream. A reader thread parses frames into an inbox; the target's progress
//! engine applies RDMA writes and reads from there, exactly as for shm.
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use channels::Doorbell;

use crate::connect::{admit, Hello, Reply};
use crate::link::{InData, Link, LinkEvent, OutData};
use crate::types::{Transport, MAX_MESSAGE};
use crate::wire::{Kind, Msg, MSG_LEN, RESP_WITH_DATA};
use crate::{IcError, Result};

/// Bytes of payload the reader may hold before it stops reading (backpressure).
const INBOX_CAP: u64 = 64 << 20;

struct Inbox {
    q: Mutex<VecDeque<LinkEvent>>,
    bytes: AtomicU64,
    bell: Doorbell,
}

impl Inbox {
    fn push(&self, ev: LinkEvent) {
        self.q
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(ev);
        let _ = self.bell.notify();
    }
}

pub(crate) struct TcpLink {
    stream: TcpStream,
    inbox: Arc<Inbox>,
    reader: Option<JoinHandle<()>>,
    closed: bool,
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
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| IcError::io("set_write_timeout", e))?;
    let inbox = Arc::new(Inbox {
        q: Mutex::new(VecDeque::new()),
        bytes: AtomicU64::new(0),
        bell: Doorbell::new()?,
    });
    let rs = stream
        .try_clone()
        .map_err(|e| IcError::io("dup socket", e))?;
    let ib = inbox.clone();
    let reader = std::thread::Builder::new()
        .name("ic-tcp-rx".into())
        .spawn(move || reader_loop(rs, ib))
        .map_err(|e| IcError::io("spawn tcp reader", e))?;
    Ok(TcpLink {
        stream,
        inbox,
        reader: Some(reader),
        closed: false,
    })
}

fn reader_loop(mut s: TcpStream, inbox: Arc<Inbox>) {
    loop {
        let mut h = [0u8; MSG_LEN];
        if let Err(e) = s.read_exact(&mut h) {
            inbox.push(LinkEvent::Lost(format!("connection broken: {e}")));
            return;
        }
        let Some(m) = Msg::decode(&h) else {
            inbox.push(LinkEvent::Lost("peer sent an undecodable message".into()));
            return;
        };
        if m.kind == Kind::Close {
            inbox.push(LinkEvent::Closed);
            return;
        }
        let data = if m.carries_payload() {
            if m.len > MAX_MESSAGE {
                inbox.push(LinkEvent::Lost(
                    "peer announced an oversized payload".into(),
                ));
                return;
            }
            while inbox.bytes.load(Ordering::Acquire) > INBOX_CAP {
                std::thread::sleep(Duration::from_micros(200));
            }
            let mut v = vec![0u8; m.len as usize];
            if let Err(e) = s.read_exact(&mut v) {
                inbox.push(LinkEvent::Lost(format!(
                    "connection broken mid-payload: {e}"
                )));
                return;
            }
            inbox.bytes.fetch_add(m.len, Ordering::AcqRel);
            InData::Bytes(v)
        } else {
            InData::None
        };
        inbox.push(LinkEvent::Msg(m, data));
    }
}

pub(crate) fn connect(addr: SocketAddr, hello: &Hello, timeout: Duration) -> Result<TcpLink> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| IcError::io(format!("connect {addr}"), e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| IcError::io("set_read_timeout", e))?;
    write_frame(
        &mut s,
        &serde_json::to_vec(hello).map_err(|e| IcError::Protocol(e.to_string()))?,
    )?;
    let reply: Reply = serde_json::from_slice(&read_frame(&mut s)?)
        .map_err(|e| IcError::Protocol(format!("bad reply: {e}")))?;
    if !reply.ok {
        return Err(IcError::Refused(reply.reason));
    }
    start(s)
}

pub(crate) fn accept(mut s: TcpStream, name: &str, allow: &[String]) -> Result<(TcpLink, String)> {
    s.set_nonblocking(false)
        .map_err(|e| IcError::io("set_nonblocking", e))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| IcError::io("set_read_timeout", e))?;
    let hello: Hello = serde_json::from_slice(&read_frame(&mut s)?)
        .map_err(|e| IcError::Protocol(format!("bad hello: {e}")))?;
    let ok = admit(&hello, name, allow, Transport::Tcp);
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
        msg.len = if map.is_some() { len } else { msg.len };
        let h = msg.encode();
        let r = match map {
            None => self.stream.write_all(&h),
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
                    self.stream.write_all(&v)
                } else {
                    self.stream
                        .write_all(&h)
                        .and_then(|_| self.stream.write_all(payload))
                }
            }
        };
        r.map_err(|e| format!("tcp write: {e}"))
    }

    fn try_recv(&mut self) -> Option<LinkEvent> {
        let ev = self
            .inbox
            .q
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        if let Some(LinkEvent::Msg(_, InData::Bytes(v))) = &ev {
            self.inbox.bytes.fetch_sub(v.len() as u64, Ordering::AcqRel);
        }
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
        vec![self.inbox.bell.fd().as_raw_fd()]
    }

    fn close(&mut self) {
        if !self.closed {
            let _ = self.stream.write_all(&Msg::new(Kind::Close, 0).encode());
        }
        self.closed = true;
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
