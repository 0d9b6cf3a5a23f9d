//! Shared-memory transport between processes on one host.
//!
//! Per connection each side creates, and sends to the other with
//! `SCM_RIGHTS` over the connection's Unix socket:
//! * the ring it produces into (a sealed memfd from `channels`),
//! * the eventfd doorbell it consumes from (the peer rings it only when our
//!   ring's sleeping flag is up: adaptive spin-then-block),
//! * its read-response window: a memfd sealed `F_SEAL_FUTURE_WRITE` after the
//!   owner mapped it, so the peer can only map it read-only.
//!
//! Registrable buffers used as SEND/WRITE sources are exposed to the peer the
//! same way (read-only, sealed) the first time they are used; the target
//! copies straight out of them into its own memory: one copy. READ data is
//! copied by the target into its window and by the initiator out of it.
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use channels::{
    scm, ChannelError, Doorbell, Mapping, RingConsumer, RingGeometry, RingProducer, SealedMemfd,
};

use crate::connect::{admit, Admission, Challenge, Hello, Intro, Reply};
use crate::link::{InData, Link, LinkEvent, OutData};
use crate::proof::Nonce;
use crate::types::{Transport, MAX_READ};
use crate::wire::{Kind, Msg, MSG_LEN, RESP_WITH_DATA};
use crate::{IcError, Result};

/// Ring shape: 1024 slots of one message each.
pub(crate) const GEO: RingGeometry = RingGeometry {
    slots: 1024,
    slot_size: 72,
};
pub(crate) const CTRL_LEN: usize = 24;
const CTRL_EXPOSE: u8 = 1;
const CTRL_CLOSE: u8 = 2;
const CTRL_UNEXPOSE: u8 = 3;
/// How often an idle, spinning receiver looks at the control socket.
const CTRL_INTERVAL: Duration = Duration::from_micros(200);
/// Most buffers a peer may expose to us on one connection.
const MAX_PEER_BUFS: usize = 65536;

pub(crate) struct LocalSide {
    tx_fd: SealedMemfd,
    tx_map: Arc<Mapping>,
    bell: Doorbell,
    win_fd: SealedMemfd,
    win: Mapping,
}

impl LocalSide {
    pub(crate) fn new() -> Result<Self> {
        let tx_fd = GEO.create("ic-ring")?;
        let tx_map = Arc::new(tx_fd.map(true)?);
        let win_fd = SealedMemfd::create("ic-read-window", MAX_READ)?;
        let win = win_fd.map(true)?;
        win_fd.seal_future_write()?;
        Ok(LocalSide {
            tx_fd,
            tx_map,
            bell: Doorbell::new()?,
            win_fd,
            win,
        })
    }
}

pub(crate) struct ShmLink {
    sock: UnixStream,
    tx: RingProducer,
    rx: RingConsumer,
    peer_bell: Doorbell,
    my_bell: Doorbell,
    window: Mapping,
    window_busy: bool,
    peer_window: Arc<Mapping>,
    /// Our buffers the peer has a read-only mapping of.
    exposed: HashMap<u64, std::sync::Weak<crate::alloc::BufInner>>,
    peer_bufs: HashMap<u64, Arc<Mapping>>,
    close_pending: bool,
    closed: bool,
    last_ctrl: Instant,
    idle_polls: u32,
}

pub(crate) fn finish(sock: UnixStream, local: LocalSide, mut fds: Vec<OwnedFd>) -> Result<ShmLink> {
    if fds.len() != 3 {
        return Err(IcError::Protocol(format!(
            "expected 3 fds (ring, doorbell, window), got {}",
            fds.len()
        )));
    }
    let win = fds.pop().ok_or(IcError::Protocol("missing fd".into()))?;
    let bell = fds.pop().ok_or(IcError::Protocol("missing fd".into()))?;
    let ring = fds.pop().ok_or(IcError::Protocol("missing fd".into()))?;
    let ring = SealedMemfd::from_received(ring, GEO.bytes())?;
    let rx = RingConsumer::new(Arc::new(ring.map(true)?), GEO)?;
    let peer_bell = Doorbell::from_received(bell)?;
    let peer_window = Arc::new(SealedMemfd::from_received(win, MAX_READ)?.map(false)?);
    let tx = RingProducer::new(local.tx_map, GEO)?;
    sock.set_nonblocking(true)
        .map_err(|e| IcError::io("set_nonblocking", e))?;
    drop(local.tx_fd);
    drop(local.win_fd);
    Ok(ShmLink {
        sock,
        tx,
        rx,
        peer_bell,
        my_bell: local.bell,
        window: local.win,
        window_busy: false,
        peer_window,
        exposed: HashMap::new(),
        peer_bufs: HashMap::new(),
        close_pending: false,
        closed: false,
        last_ctrl: Instant::now(),
        idle_polls: 0,
    })
}

fn recv_json<T: serde::de::DeserializeOwned>(sock: &UnixStream) -> Result<(T, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let (n, fds) = scm::recv(sock, &mut buf)?;
    if n == 0 {
        return Err(IcError::Protocol("peer hung up during handshake".into()));
    }
    let v = serde_json::from_slice(&buf[..n])
        .map_err(|e| IcError::Protocol(format!("bad handshake message: {e}")))?;
    Ok((v, fds))
}

fn send_json<T: serde::Serialize>(
    sock: &UnixStream,
    v: &T,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<()> {
    let b = serde_json::to_vec(v).map_err(|e| IcError::Protocol(e.to_string()))?;
    Ok(scm::send(sock, &b, fds)?)
}

pub(crate) fn connect(path: &Path, intro: &Intro<'_>, timeout: Duration) -> Result<ShmLink> {
    let sock = UnixStream::connect(path)
        .map_err(|e| IcError::io(format!("connect {}", path.display()), e))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| IcError::io("set_read_timeout", e))?;
    let (challenge, fds): (Challenge, _) = recv_json(&sock)?;
    if !fds.is_empty() {
        return Err(IcError::Protocol("descriptors with the challenge".into()));
    }
    let local = LocalSide::new()?;
    send_json(
        &sock,
        &intro.answer(&challenge),
        &[local.tx_fd.fd(), local.bell.fd(), local.win_fd.fd()],
    )?;
    let (reply, fds): (Reply, _) = recv_json(&sock)?;
    if !reply.ok {
        return Err(IcError::Refused(reply.reason));
    }
    finish(sock, local, fds)
}

pub(crate) fn accept(sock: UnixStream, a: &Admission<'_>) -> Result<(ShmLink, String)> {
    sock.set_nonblocking(false)
        .map_err(|e| IcError::io("set_nonblocking", e))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| IcError::io("set_read_timeout", e))?;
    let nonce = Nonce::generate()?;
    send_json(&sock, &Challenge { nonce }, &[])?;
    let (hello, fds): (Hello, _) = recv_json(&sock)?;
    if let Err(reason) = admit(&hello, &nonce, a, Transport::Shm) {
        let _ = send_json(
            &sock,
            &Reply {
                ok: false,
                reason: reason.clone(),
            },
            &[],
        );
        return Err(IcError::Refused(reason));
    }
    let local = LocalSide::new()?;
    let fds_to_send = [
        local.tx_fd.fd().try_clone_to_owned(),
        local.bell.fd().try_clone_to_owned(),
        local.win_fd.fd().try_clone_to_owned(),
    ];
    let mut mine = Vec::new();
    for f in fds_to_send {
        mine.push(f.map_err(|e| IcError::io("dup", e))?);
    }
    let link = match finish(
        sock.try_clone().map_err(|e| IcError::io("dup socket", e))?,
        local,
        fds,
    ) {
        Ok(l) => l,
        Err(e) => {
            let _ = send_json(
                &sock,
                &Reply {
                    ok: false,
                    reason: e.to_string(),
                },
                &[],
            );
            return Err(e);
        }
    };
    sock.set_nonblocking(false)
        .map_err(|e| IcError::io("set_nonblocking", e))?;
    let borrowed: Vec<_> = mine.iter().map(|f| f.as_fd()).collect();
    send_json(
        &sock,
        &Reply {
            ok: true,
            reason: String::new(),
        },
        &borrowed,
    )?;
    sock.set_nonblocking(true)
        .map_err(|e| IcError::io("set_nonblocking", e))?;
    Ok((link, hello.from))
}

impl ShmLink {
    fn ctrl(
        &self,
        tag: u8,
        id: u64,
        len: u64,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> std::result::Result<(), String> {
        let mut b = [0u8; CTRL_LEN];
        b[0] = tag;
        b[8..16].copy_from_slice(&id.to_le_bytes());
        b[16..24].copy_from_slice(&len.to_le_bytes());
        let fds: Vec<_> = fd.into_iter().collect();
        let start = Instant::now();
        loop {
            match scm::send(&self.sock, &b, &fds) {
                Ok(()) => return Ok(()),
                Err(ChannelError::Os { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock
                        && start.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Tells the peer to unmap our buffers that no longer exist here (their
    /// memory is freed once the peer lets go). Runs whenever a new buffer is
    /// exposed, so the number of mappings tracks the live buffers.
    fn forget_dropped_buffers(&mut self) -> std::result::Result<(), String> {
        let dead: Vec<u64> = self
            .exposed
            .iter()
            .filter(|(_, w)| w.strong_count() == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.ctrl(CTRL_UNEXPOSE, id, 0, None)?;
            self.exposed.remove(&id);
        }
        Ok(())
    }

    /// Reads pending control messages. Returns an event if the link ended.
    pub(crate) fn drain_ctrl(&mut self) -> Option<LinkEvent> {
        self.last_ctrl = Instant::now();
        loop {
            let mut b = [0u8; CTRL_LEN];
            match scm::recv(&self.sock, &mut b) {
                Ok((0, _)) => {
                    self.closed = true;
                    return Some(LinkEvent::Lost(
                        "peer hung up without closing (process died?)".into(),
                    ));
                }
                Ok((CTRL_LEN, mut fds)) => {
                    let id = u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8]));
                    let len = u64::from_le_bytes(b[16..24].try_into().unwrap_or([0; 8]));
                    match (b[0], fds.len()) {
                        (CTRL_EXPOSE, 1) if self.peer_bufs.len() < MAX_PEER_BUFS => {
                            let fd = fds.remove(0);
                            match SealedMemfd::from_received(fd, len).and_then(|m| m.map(false)) {
                                Ok(map) => {
                                    self.peer_bufs.insert(id, Arc::new(map));
                                }
                                Err(e) => {
                                    self.closed = true;
                                    return Some(LinkEvent::Lost(format!(
                                        "peer exposed an unusable buffer: {e}"
                                    )));
                                }
                            }
                        }
                        (CTRL_UNEXPOSE, 0) => {
                            self.peer_bufs.remove(&id);
                        }
                        (CTRL_CLOSE, 0) => {
                            // Stop reading: the hang-up that follows is not a loss.
                            self.close_pending = true;
                            return None;
                        }
                        _ => {
                            self.closed = true;
                            return Some(LinkEvent::Lost(
                                "peer sent an invalid control message".into(),
                            ));
                        }
                    }
                }
                Ok(_) => {
                    self.closed = true;
                    return Some(LinkEvent::Lost(
                        "peer sent a truncated control message".into(),
                    ));
                }
                Err(ChannelError::Os { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    return None
                }
                Err(e) => {
                    self.closed = true;
                    return Some(LinkEvent::Lost(format!("control socket: {e}")));
                }
            }
        }
    }
}

impl Link for ShmLink {
    fn transport(&self) -> Transport {
        Transport::Shm
    }

    fn send(&mut self, mut msg: Msg, data: OutData<'_>) -> std::result::Result<(), String> {
        if self.closed {
            return Err("link closed".into());
        }
        match data {
            OutData::None => {}
            OutData::Source { buf, off, .. } => {
                let id = buf.inner.id;
                if !self.exposed.contains_key(&id) {
                    self.forget_dropped_buffers()?;
                    self.ctrl(CTRL_EXPOSE, id, buf.len(), Some(buf.inner.memfd.fd()))?;
                    self.exposed.insert(id, Arc::downgrade(&buf.inner));
                }
                msg.src_id = id;
                msg.src_off = off;
            }
            OutData::ReadData { map, off, len } => {
                self.window
                    .copy_from(0, map, off, len)
                    .map_err(|e| e.to_string())?;
                self.window_busy = true;
                msg.src_id = RESP_WITH_DATA;
                msg.src_off = 0;
            }
        }
        let enc = msg.encode();
        let start = Instant::now();
        while !self.tx.try_push(&enc).map_err(|e| e.to_string())? {
            if self.tx.consumer_sleeping() {
                let _ = self.peer_bell.notify();
            }
            if start.elapsed() > Duration::from_secs(5) {
                return Err("peer stopped consuming its ring".into());
            }
            std::thread::yield_now();
        }
        if self.tx.consumer_sleeping() {
            self.peer_bell.notify().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn try_recv(&mut self) -> Option<LinkEvent> {
        if self.closed {
            return None;
        }
        let mut buf = [0u8; 72];
        loop {
            let n = match self.rx.try_pop(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    if self.close_pending {
                        self.closed = true;
                        return Some(LinkEvent::Closed);
                    }
                    // The control socket is read only when the ring is idle
                    // (and at most every CTRL_INTERVAL while spinning), so
                    // the polling fast path makes no system call. Messages
                    // that need an fd first force a read (see below).
                    self.idle_polls = self.idle_polls.wrapping_add(1);
                    if self.idle_polls % 32 == 0 && self.last_ctrl.elapsed() >= CTRL_INTERVAL {
                        if let Some(ev) = self.drain_ctrl() {
                            return Some(ev);
                        }
                        if self.close_pending {
                            continue;
                        }
                    }
                    return None;
                }
                Err(e) => {
                    self.closed = true;
                    return Some(LinkEvent::Lost(format!("ring: {e}")));
                }
            };
            let Some(m) = (n == MSG_LEN).then(|| Msg::decode(&buf[..n])).flatten() else {
                self.closed = true;
                return Some(LinkEvent::Lost("peer wrote an undecodable message".into()));
            };
            let data = match m.kind {
                Kind::ReadDone => {
                    self.window_busy = false;
                    continue;
                }
                Kind::Send | Kind::Write => {
                    if !self.peer_bufs.contains_key(&m.src_id) && !self.close_pending {
                        // The EXPOSE was sent before the ring entry; pick it up.
                        if let Some(ev) = self.drain_ctrl() {
                            return Some(ev);
                        }
                    }
                    match self.peer_bufs.get(&m.src_id) {
                        Some(map) => InData::Mapped {
                            map: map.clone(),
                            off: m.src_off,
                            len: m.len,
                        },
                        None => InData::None,
                    }
                }
                Kind::Resp if m.src_id == RESP_WITH_DATA => InData::Mapped {
                    map: self.peer_window.clone(),
                    off: m.src_off,
                    len: m.len,
                },
                _ => InData::None,
            };
            return Some(LinkEvent::Msg(m, data));
        }
    }

    fn read_window_free(&self) -> bool {
        !self.window_busy
    }

    fn read_done(&mut self) -> std::result::Result<(), String> {
        self.send(Msg::new(Kind::ReadDone, 0), OutData::None)
    }

    fn arm(&self, sleeping: bool) {
        self.rx.set_sleeping(sleeping);
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        vec![self.my_bell.fd().as_raw_fd(), self.sock.as_raw_fd()]
    }

    fn close(&mut self) {
        if !self.closed {
            let _ = self.ctrl(CTRL_CLOSE, 0, 0, None);
        }
        self.closed = true;
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
