//! The `vsock=` actions on a virtio-vsock device: one stream connection
//! at a time, as a listener (`listen`, `echo`) or a connector (`send`,
//! `ping`); `listen` and `send` move the test pattern in both directions
//! at once, within the peer's credit, verifying every byte received. Report lines and exit codes are
//! listed in resources/guests/README.md.
//!
//! Every wait sleeps in HLT and is bounded by the LAPIC one-shot timer.

use crate::arch::{irq_total, VEC_VIRTIO};
use crate::drivers::virtio_mmio::Transport;
use crate::drivers::virtio_vsock::{
    DeviceError, Vsock, DEVICE_VSOCK, HDR_LEN, MAX_PAYLOAD, RX_PAYLOAD,
};
use crate::say;
use crate::words::{vsock_pattern, VsockWord, MAX_PINGS};
use crate::workloads::blk::Devices;
use crate::workloads::clock::Clock;
use crate::workloads::Boot;

/// Exit code: a `vsock=` word found no modern virtio-vsock device.
pub const EXIT_NO_DEVICE: u32 = 30;
/// Exit code: the device could not be initialised.
pub const EXIT_INIT: u32 = 31;
/// Exit code: `listen` received bytes that are not the pattern.
pub const EXIT_VERIFY: u32 = 32;
/// Exit code: a bounded wait ran out.
pub const EXIT_TIMEOUT: u32 = 33;
/// Exit code: the connection was refused or reset.
pub const EXIT_RESET: u32 = 34;
/// Exit code: the device needs a reset or returned a buffer never posted.
pub const EXIT_DEVICE: u32 = 35;

/// How long a listener waits for its peer, and a sender for the answer.
const PEER_NS: u64 = 10_000_000_000;
/// A transfer in progress must advance within this time.
const PROGRESS_NS: u64 = 2_000_000_000;
/// What this guest advertises as its receive buffer.
const BUF_ALLOC: u32 = 256 * 1024;
/// Consumed bytes after which the listener sends a credit update.
const CREDIT_EVERY: u32 = 64 * 1024;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// The fields of a header this guest uses.
#[derive(Clone, Copy)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

impl Hdr {
    fn decode(b: &[u8]) -> Hdr {
        Hdr {
            src_cid: le64(b, 0),
            dst_cid: le64(b, 8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }

    fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&1u16.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// How a word ended early.
enum Fail {
    Timeout(&'static str),
    Reset,
    Verify(u64),
    Device(DeviceError),
}

impl Fail {
    fn report(self) -> u32 {
        match self {
            Fail::Timeout(what) => {
                say!("vsock: timeout: {what}");
                EXIT_TIMEOUT
            }
            Fail::Reset => {
                say!("vsock: connection reset");
                EXIT_RESET
            }
            Fail::Verify(at) => {
                say!("vsock: received byte {at} is not the pattern");
                EXIT_VERIFY
            }
            Fail::Device(e) => {
                say!("vsock: device error: {e:?}");
                EXIT_DEVICE
            }
        }
    }
}

/// One connection's state as this guest sees it.
struct Conn {
    me: (u64, u32),
    peer: (u64, u32),
    /// Payload bytes sent; the peer's last buf_alloc and fwd_cnt.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes consumed, and at the last credit update.
    fwd_cnt: u32,
    fwd_told: u32,
}

impl Conn {
    fn header(&self, op: u16, len: u32) -> [u8; HDR_LEN] {
        Hdr {
            src_cid: self.me.0,
            dst_cid: self.peer.0,
            src_port: self.me.1,
            dst_port: self.peer.1,
            len,
            op,
            flags: if op == OP_SHUTDOWN { 3 } else { 0 },
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
        .encode()
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn ours(&self, h: &Hdr) -> bool {
        (h.src_cid, h.src_port) == self.peer && (h.dst_cid, h.dst_port) == self.me
    }
}

/// What a sleeping word waits for.
#[derive(Clone, Copy)]
enum Wake {
    /// A received packet.
    Rx,
    /// A received packet or a transmit buffer back.
    Any,
}

/// The device and the clock of one word.
struct Link<'a> {
    dev: &'a mut Vsock,
    clock: Clock,
    /// The last connection request seen while a word was busy with
    /// something else (a listener's backlog of one): a peer that connects
    /// before the next word listens is answered by that word.
    backlog: &'a mut Option<Hdr>,
}

impl Link<'_> {
    /// Queue a packet, waiting for a free transmit buffer.
    fn send(
        &mut self,
        hdr: &[u8; HDR_LEN],
        payload: impl Fn(&mut [u8]) -> usize,
    ) -> Result<(), Fail> {
        let deadline = self.clock.now() + PROGRESS_NS;
        loop {
            self.dev.service();
            if self.dev.send(hdr, &payload) {
                self.dev.flush();
                return Ok(());
            }
            self.sleep_for(deadline, "no transmit buffer came back", Wake::Any)?;
        }
    }

    /// Sleep until a packet arrives (or `deadline`, then fail with `what`).
    fn sleep(&mut self, deadline: u64, what: &'static str) -> Result<(), Fail> {
        self.sleep_for(deadline, what, Wake::Rx)
    }

    /// Sleep until an interrupt of kind `wake` (or `deadline`, then fail
    /// with `what`).
    fn sleep_for(&mut self, deadline: u64, what: &'static str, wake: Wake) -> Result<(), Fail> {
        let seen = irq_total();
        if let Some(e) = self.dev.error() {
            return Err(Fail::Device(e));
        }
        if self.clock.now() >= deadline {
            return Err(Fail::Timeout(what));
        }
        let pending = match wake {
            Wake::Rx => self.dev.arm_rx(),
            Wake::Any => self.dev.arm(),
        };
        if pending {
            return Ok(());
        }
        self.clock.arm_until(deadline);
        crate::abi::wait(seen);
        Ok(())
    }

    /// The next packet: its header, and `on_payload` run on its payload
    /// before the buffer goes back.
    fn recv(
        &mut self,
        deadline: u64,
        what: &'static str,
        mut on_payload: impl FnMut(&Hdr, &[u8]) -> Result<(), Fail>,
    ) -> Result<Hdr, Fail> {
        loop {
            self.dev.service();
            if let Some(rx) = self.dev.recv() {
                let bytes = self.dev.packet(rx);
                let h = Hdr::decode(bytes);
                if h.op == OP_REQUEST {
                    *self.backlog = Some(h);
                }
                let end = (HDR_LEN + h.len as usize).min(bytes.len());
                let r = on_payload(&h, &bytes[HDR_LEN..end]);
                self.dev.recycle(rx.desc);
                self.dev.flush();
                r?;
                return Ok(h);
            }
            self.sleep(deadline, what)?;
        }
    }
}

/// State of the `vsock=` words: the selected device, once initialised.
pub struct VsockState {
    dev: Option<Vsock>,
    backlog: Option<Hdr>,
}

impl VsockState {
    /// No device initialised yet.
    pub fn new() -> VsockState {
        VsockState {
            dev: None,
            backlog: None,
        }
    }

    /// Run one `vsock=` word. `Err(code)` is the exit code of its failure
    /// (already reported).
    pub fn run(&mut self, boot: &Boot, devices: &Devices, word: VsockWord) -> Result<(), u32> {
        if self.dev.is_none() {
            let Some(t) = devices.device(DEVICE_VSOCK, 0) else {
                say!("vsock: no usable virtio-vsock device");
                return Err(EXIT_NO_DEVICE);
            };
            self.dev = Some(init(boot, t)?);
        }
        let Some(dev) = self.dev.as_mut() else {
            return Err(EXIT_INIT);
        };
        let mut link = Link {
            dev,
            clock: Clock::start(),
            backlog: &mut self.backlog,
        };
        let result = match word {
            VsockWord::Cid => Ok(()),
            VsockWord::Listen {
                port,
                recv,
                send: tx,
            } => listen(&mut link, port, recv, tx),
            VsockWord::Send {
                cid,
                port,
                send: tx,
                recv,
                packet,
            } => send(&mut link, cid, port, (tx, recv), packet),
            VsockWord::Echo { port } => echo(&mut link, port),
            VsockWord::Ping {
                cid,
                port,
                count,
                size,
            } => ping(&mut link, cid, port, count, size),
        };
        result.map_err(Fail::report)
    }
}

fn init(boot: &Boot, t: Transport) -> Result<Vsock, u32> {
    if !boot.route_gsi(t.gsi, VEC_VIRTIO) {
        say!("vsock: init failed: gsi {} is on no IOAPIC", t.gsi);
        return Err(EXIT_INIT);
    }
    let dev = Vsock::init(t).map_err(|e| {
        say!("vsock: init failed: {}", e.describe("socket"));
        EXIT_INIT
    })?;
    say!(
        "vsock: ready cid={} queue={} features=0x{:016x}",
        dev.cid,
        dev.rx_size(),
        dev.features
    );
    Ok(dev)
}

/// FNV-1a 64 over a byte stream: the checksum both ends print.
#[derive(Clone, Copy)]
struct Sum(u64);

impl Sum {
    fn new() -> Sum {
        Sum(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
}

/// What one connection moves: totals, progress and checksums.
struct Flow {
    /// Largest payload of one packet sent.
    packet: u32,
    send_total: u64,
    recv_total: u64,
    sent: u64,
    got: u64,
    tx_sum: Sum,
    rx_sum: Sum,
    /// The peer sent SHUTDOWN.
    peer_shut: bool,
    /// A credit update is owed to the peer.
    owe_update: bool,
}

impl Flow {
    fn new(send_total: u64, recv_total: u64) -> Flow {
        Flow {
            packet: MAX_PAYLOAD as u32,
            send_total,
            recv_total,
            sent: 0,
            got: 0,
            tx_sum: Sum::new(),
            rx_sum: Sum::new(),
            peer_shut: false,
            owe_update: false,
        }
    }

    fn done(&self) -> bool {
        self.sent == self.send_total && self.got >= self.recv_total && !self.owe_update
    }
}

/// Takes every packet waiting: verifies and counts RW payloads of `c`
/// against the pattern, keeps the peer's credit, notes SHUTDOWN and
/// CREDIT_REQUEST. Returns whether anything arrived.
fn take_rx(link: &mut Link<'_>, c: &mut Conn, f: &mut Flow) -> Result<bool, Fail> {
    let mut any = false;
    link.dev.service();
    while let Some(rx) = link.dev.recv() {
        any = true;
        let bytes = link.dev.packet(rx);
        let h = Hdr::decode(bytes);
        if h.op == OP_REQUEST {
            *link.backlog = Some(h);
        }
        let mut bad = None;
        if c.ours(&h) && h.op == OP_RW {
            let end = (HDR_LEN + h.len as usize).min(bytes.len());
            for (i, b) in bytes[HDR_LEN..end].iter().enumerate() {
                let at = f.got + i as u64;
                if *b != vsock_pattern(at) && bad.is_none() {
                    bad = Some(at);
                }
                f.rx_sum.add(*b);
            }
        }
        link.dev.recycle(rx.desc);
        if !c.ours(&h) {
            continue;
        }
        if let Some(at) = bad {
            link.dev.flush();
            return Err(Fail::Verify(at));
        }
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RST => {
                link.dev.flush();
                return Err(Fail::Reset);
            }
            OP_RW => {
                f.got += u64::from(h.len);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
            }
            OP_SHUTDOWN => f.peer_shut = true,
            OP_CREDIT_REQUEST => f.owe_update = true,
            _ => {}
        }
    }
    if c.fwd_cnt.wrapping_sub(c.fwd_told) >= CREDIT_EVERY {
        f.owe_update = true;
    }
    Ok(any)
}

/// Moves `f`'s bytes over `c` in both directions at once until both totals
/// are reached: sends while the peer has credit and a transmit buffer is
/// free, takes what arrives, sleeps (HLT) when neither can advance.
fn exchange(link: &mut Link<'_>, c: &mut Conn, f: &mut Flow) -> Result<(), Fail> {
    let mut last = link.clock.now();
    loop {
        let mut progressed = take_rx(link, c, f)?;
        // Out of transmit buffers: the next wakeup may be one coming back.
        let mut tx_full = false;
        if f.owe_update {
            let hdr = c.header(OP_CREDIT_UPDATE, 0);
            if link.dev.send(&hdr, |_| 0) {
                c.fwd_told = c.fwd_cnt;
                f.owe_update = false;
                progressed = true;
            } else {
                tx_full = true;
            }
        }
        while f.sent < f.send_total {
            let room = c.credit().min(f.packet);
            if room == 0 {
                break;
            }
            let n = u64::from(room).min(f.send_total - f.sent) as usize;
            let hdr = c.header(OP_RW, n as u32);
            let from = f.sent;
            let mut sum = f.tx_sum;
            let queued = link.dev.send(&hdr, |buf| {
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = vsock_pattern(from + i as u64);
                    sum.add(*b);
                }
                n
            });
            if !queued {
                tx_full = true;
                break;
            }
            f.tx_sum = sum;
            f.sent += n as u64;
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            // The header carried our fwd_cnt: that is a credit update too.
            c.fwd_told = c.fwd_cnt;
            progressed = true;
        }
        link.dev.flush();
        if f.done() {
            return Ok(());
        }
        if progressed {
            last = link.clock.now();
            continue;
        }
        let what = if f.sent < f.send_total && c.credit() == 0 {
            "no credit from the peer"
        } else {
            "the stream stalled"
        };
        let wake = if tx_full { Wake::Any } else { Wake::Rx };
        link.sleep_for(last + PROGRESS_NS, what, wake)?;
    }
}

/// Waits for the first REQUEST to `port` and answers it.
fn accept(link: &mut Link<'_>, port: u32) -> Result<Conn, Fail> {
    say!("vsock: listening on port {port}");
    let cid = link.dev.cid;
    let deadline = link.clock.now() + PEER_NS;
    let req = loop {
        if let Some(h) = link
            .backlog
            .take_if(|h| h.dst_port == port && h.dst_cid == cid)
        {
            break h;
        }
        link.recv(deadline, "no connection request", |_, _| Ok(()))?;
    };
    let c = Conn {
        me: (cid, port),
        peer: (req.src_cid, req.src_port),
        tx_cnt: 0,
        peer_buf_alloc: req.buf_alloc,
        peer_fwd_cnt: req.fwd_cnt,
        fwd_cnt: 0,
        fwd_told: 0,
    };
    let hdr = c.header(OP_RESPONSE, 0);
    link.send(&hdr, |_| 0)?;
    Ok(c)
}

/// Sends a REQUEST to `cid:port` and waits for the RESPONSE.
fn connect(link: &mut Link<'_>, cid: u64, port: u32) -> Result<Conn, Fail> {
    let me = (link.dev.cid, 1024 + (link.clock.now() as u32 % 30_000));
    let mut c = Conn {
        me,
        peer: (cid, port),
        tx_cnt: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        fwd_cnt: 0,
        fwd_told: 0,
    };
    let hdr = c.header(OP_REQUEST, 0);
    link.send(&hdr, |_| 0)?;
    let deadline = link.clock.now() + PEER_NS;
    loop {
        let h = link.recv(deadline, "no answer to the connection request", |_, _| {
            Ok(())
        })?;
        if !c.ours(&h) {
            continue;
        }
        match h.op {
            OP_RESPONSE => {
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                return Ok(c);
            }
            OP_RST => {
                say!("vsock: connect to {cid}:{port} refused");
                return Err(Fail::Reset);
            }
            _ => {}
        }
    }
}

/// The connecting side's end: SHUTDOWN, then wait for the listener's RST.
fn close_as_connector(link: &mut Link<'_>, c: &Conn) -> Result<(), Fail> {
    let hdr = c.header(OP_SHUTDOWN, 0);
    link.send(&hdr, |_| 0)?;
    let deadline = link.clock.now() + PROGRESS_NS;
    loop {
        let h = link.recv(deadline, "no reset after the shutdown", |_, _| Ok(()))?;
        if c.ours(&h) && h.op == OP_RST {
            return Ok(());
        }
    }
}

/// The listening side's end: wait for the peer's SHUTDOWN (unless it came
/// already), answer with a RST as a Linux listener does.
fn close_as_listener(link: &mut Link<'_>, c: &Conn, shut: bool) -> Result<(), Fail> {
    if !shut {
        let deadline = link.clock.now() + PROGRESS_NS;
        loop {
            let h = link.recv(deadline, "no shutdown after the stream", |_, _| Ok(()))?;
            if c.ours(&h) && (h.op == OP_SHUTDOWN || h.op == OP_RST) {
                break;
            }
        }
    }
    let hdr = c.header(OP_RST, 0);
    link.send(&hdr, |_| 0)
}

fn report(link: &mut Link<'_>, c: &Conn, f: &Flow, t0: u64) {
    let us = (link.clock.now() - t0) / 1000;
    let (peer_cid, peer_port) = c.peer;
    if f.recv_total > 0 {
        say!(
            "vsock: received {} bytes from {peer_cid}:{peer_port} ok in {us} us sum={:016x}",
            f.got,
            f.rx_sum.0
        );
    }
    if f.send_total > 0 {
        say!(
            "vsock: sent {} bytes to {peer_cid}:{peer_port} in {us} us sum={:016x}",
            f.sent,
            f.tx_sum.0
        );
    }
}

/// Accept one connection on `port`; receive and verify `recv` bytes while
/// sending `send`; then close it.
fn listen(link: &mut Link<'_>, port: u32, recv: u64, send: u64) -> Result<(), Fail> {
    let mut c = accept(link, port)?;
    let t0 = link.clock.now();
    let mut f = Flow::new(send, recv);
    exchange(link, &mut c, &mut f)?;
    report(link, &c, &f, t0);
    close_as_listener(link, &c, f.peer_shut)
}

/// Connect to `cid:port`; send `send` bytes within the peer's credit, in
/// packets of at most `packet` bytes, while receiving and verifying `recv`;
/// then shut the connection down.
fn send(
    link: &mut Link<'_>,
    cid: u64,
    port: u32,
    (send, recv): (u64, u64),
    packet: u32,
) -> Result<(), Fail> {
    let mut c = connect(link, cid, port)?;
    let t0 = link.clock.now();
    let mut f = Flow::new(send, recv);
    f.packet = packet.min(MAX_PAYLOAD as u32);
    exchange(link, &mut c, &mut f)?;
    report(link, &c, &f, t0);
    close_as_connector(link, &c)
}

/// Accept one connection on `port` and send every RW payload back until
/// the peer shuts down.
fn echo(link: &mut Link<'_>, port: u32) -> Result<(), Fail> {
    let mut c = accept(link, port)?;
    let mut buf = [0u8; RX_PAYLOAD];
    let mut echoed = 0u64;
    loop {
        let mut n = 0usize;
        let deadline = link.clock.now() + PEER_NS;
        let h = link.recv(deadline, "the pinger went quiet", |h, payload| {
            if h.op == OP_RW {
                n = payload.len().min(buf.len());
                buf[..n].copy_from_slice(&payload[..n]);
            }
            Ok(())
        })?;
        if !c.ours(&h) {
            continue;
        }
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RST => return Err(Fail::Reset),
            OP_SHUTDOWN => break,
            OP_RW => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
                // The peer's credit is far larger than one message.
                let hdr = c.header(OP_RW, n as u32);
                link.send(&hdr, |out| {
                    out[..n].copy_from_slice(&buf[..n]);
                    n
                })?;
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.fwd_told = c.fwd_cnt;
                echoed += n as u64;
            }
            _ => {}
        }
    }
    say!("vsock: echoed {echoed} bytes");
    close_as_listener(link, &c, true)
}

/// Connect to an echo at `cid:port` and time `count` round trips of `size`
/// bytes; prints the median and 99th percentile.
fn ping(link: &mut Link<'_>, cid: u64, port: u32, count: u32, size: u32) -> Result<(), Fail> {
    let mut c = connect(link, cid, port)?;
    let mut rtt = [0u32; MAX_PINGS as usize];
    let n = size as usize;
    for sample in rtt.iter_mut().take(count as usize) {
        let t = link.clock.now();
        let hdr = c.header(OP_RW, size);
        link.send(&hdr, |buf| {
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = vsock_pattern(j as u64);
            }
            n
        })?;
        c.tx_cnt = c.tx_cnt.wrapping_add(size);
        let mut back = 0usize;
        while back < n {
            let deadline = link.clock.now() + PROGRESS_NS;
            let h = link.recv(deadline, "no echo", |_, _| Ok(()))?;
            if !c.ours(&h) {
                continue;
            }
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            match h.op {
                OP_RST => return Err(Fail::Reset),
                OP_RW => {
                    back += h.len as usize;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
                }
                _ => {}
            }
        }
        *sample = u32::try_from(link.clock.now() - t).unwrap_or(u32::MAX);
    }
    let samples = &mut rtt[..count as usize];
    samples.sort_unstable();
    let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
    say!(
        "vsock: {count} round trips of {size} bytes to {cid}:{port}: p50={} ns p99={} ns",
        at(50),
        at(99)
    );
    close_as_connector(link, &c)
}
