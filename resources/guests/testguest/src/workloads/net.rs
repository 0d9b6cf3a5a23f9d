//! The `net=` actions on a virtio-net device: flow-controlled bulk transfer
//! with cumulative acknowledgements (`send` / `recv`), round trips (`ping` /
//! `pong`), listening (`expect-none`, `recv-any`) and odd senders
//! (`spoof`, `broadcast`). Frame format: `net_frame.rs`. Report lines and
//! exit codes are listed in resources/guests/README.md.
//!
//! Every wait sleeps in HLT and is bounded by the LAPIC one-shot timer,
//! which is also the clock ([`Clock`]).

use crate::arch::{irq_total, VEC_VIRTIO};
use crate::drivers::virtio_mmio::Transport;
use crate::drivers::virtio_net::{DeviceError, Net, DEVICE_NET};
use crate::net_frame::{
    build, ethertype, parse, Frame, Kind, Mac, NotOurs, SeqTracker, BROADCAST, BROADCAST_LEN,
    SMALL_LEN, SPOOF_SOURCE,
};
use crate::say;
use crate::words::NetWord;
use crate::workloads::blk::Devices;
use crate::workloads::clock::Clock;
use crate::workloads::Boot;

/// Exit code: a `net=` word found no modern virtio-net device.
pub const EXIT_NO_DEVICE: u32 = 20;
/// Exit code: the device could not be initialised.
pub const EXIT_INIT: u32 = 21;
/// Exit code: `net=recv` saw lost, damaged or duplicated frames.
pub const EXIT_VERIFY: u32 = 22;
/// Exit code: a bounded wait ran out (peer silent, no progress).
pub const EXIT_TIMEOUT: u32 = 23;
/// Exit code: the device needs a reset or returned a buffer never posted.
pub const EXIT_DEVICE: u32 = 24;

/// How long a sender or receiver waits for its peer to appear.
const PEER_NS: u64 = 10_000_000_000;
/// Hello retransmission interval while looking for the peer.
const HELLO_NS: u64 = 20_000_000;
/// A transfer in progress must advance within this time.
const PROGRESS_NS: u64 = 2_000_000_000;
/// A sender whose acks stall this long asks for one (a hello).
const POKE_NS: u64 = 200_000_000;
/// `recv-any` waits this long for each frame.
const ANY_NS: u64 = 10_000_000_000;
/// Transmit buffers get this long to be completed before a word ends.
const DRAIN_NS: u64 = 2_000_000_000;
/// Frames taken from the receive ring per batch.
const BATCH: usize = 64;
/// `bad-tx` gives the device this long to react.
const BAD_NS: u64 = 1_000_000_000;
/// Bytes of the `bad-tx` buffer (less than the 12-byte header).
const BAD_TX_BYTES: u32 = 4;
/// `expect-none` prints at most this many frames.
const SHOW_MAX: u32 = 16;

/// One received frame, decoded before its buffer goes back.
#[derive(Clone, Copy)]
struct Event {
    desc: u16,
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
    len: usize,
    frame: Result<Frame, NotOurs>,
}

const NO_EVENT: Event = Event {
    desc: 0,
    dst: [0; 6],
    src: [0; 6],
    ethertype: 0,
    len: 0,
    frame: Err(NotOurs::Length),
};

impl Event {
    /// An intact frame of ours of `kind` (from `from`, if given).
    fn ours(&self, kind: Kind, from: Option<[u8; 6]>) -> Option<Frame> {
        let f = self.frame.ok()?;
        (f.intact && f.kind == kind && from.is_none_or(|m| m == f.src)).then_some(f)
    }

    fn show(&self) {
        match self.frame.ok() {
            Some(f) => say!(
                "net: frame src={} dst={} type=0x{:04x} len={} pvnf={}:{}:{}",
                Mac(self.src),
                Mac(self.dst),
                self.ethertype,
                self.len,
                f.kind.name(),
                f.seq,
                if f.intact { "ok" } else { "bad" }
            ),
            None => say!(
                "net: frame src={} dst={} type=0x{:04x} len={}",
                Mac(self.src),
                Mac(self.dst),
                self.ethertype,
                self.len
            ),
        }
    }
}

/// Why a word stopped.
enum Fail {
    Timeout,
    Device(DeviceError),
}

/// Frames taken from the receive ring and not yet consumed by a word. It
/// outlives the words, so a frame that arrives in the same batch as the
/// last one a word wanted is there for the next word.
pub struct Inbox {
    events: [Event; BATCH],
    head: usize,
    len: usize,
    /// The receive buffers of `events[..len]` have not been given back
    /// (`recv` with a delay).
    held: bool,
}

impl Inbox {
    /// Empty.
    pub fn new() -> Inbox {
        Inbox {
            events: [NO_EVENT; BATCH],
            head: 0,
            len: 0,
            held: false,
        }
    }

    /// Forget everything (the device is being reset: its buffers go too).
    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
        self.held = false;
    }
}

/// A live device with its clock and inbox: the waiting and sending
/// primitives.
struct Link<'a> {
    net: &'a mut Net,
    clock: Clock,
    inbox: &'a mut Inbox,
}

/// What [`Link::next_event`] found.
enum Next {
    /// A frame.
    Frame(Event),
    /// `until` passed, or a transmit buffer completed.
    Wake,
}

impl Link<'_> {
    fn mac(&self) -> [u8; 6] {
        self.net.mac
    }

    fn now(&mut self) -> u64 {
        self.clock.now()
    }

    /// Queue one frame of ours; false if no transmit buffer is free.
    fn send(&mut self, dst: [u8; 6], src: [u8; 6], kind: Kind, seq: u64, len: usize) -> bool {
        self.net
            .send(|buf| build(buf, dst, src, kind, seq, len).unwrap_or(0))
    }

    /// Whether the last batch taken from the ring is used up.
    fn batch_done(&self) -> bool {
        self.inbox.head == self.inbox.len
    }

    /// The next frame: from the inbox, else from the ring (a batch of up to
    /// [`BATCH`], whose buffers go straight back to the device unless
    /// `hold`). Sleeps until a frame arrives; returns [`Next::Wake`] when
    /// `until` passes or a transmit buffer completes, and a timeout when
    /// `deadline` passes.
    fn next_event(&mut self, until: u64, deadline: u64, hold: bool) -> Result<Next, Fail> {
        if self.inbox.head < self.inbox.len {
            self.inbox.head += 1;
            return Ok(Next::Frame(self.inbox.events[self.inbox.head - 1]));
        }
        self.give_back();
        loop {
            let seen = irq_total();
            let tx_before = self.net.tx_in_flight();
            self.net.service();
            let mut n = 0;
            while n < BATCH {
                let Some(rx) = self.net.recv() else { break };
                let f = self.net.frame(rx);
                let mut dst = [0u8; 6];
                let mut src = [0u8; 6];
                if f.len() >= 12 {
                    dst.copy_from_slice(&f[0..6]);
                    src.copy_from_slice(&f[6..12]);
                }
                self.inbox.events[n] = Event {
                    desc: rx.desc,
                    dst,
                    src,
                    ethertype: ethertype(f),
                    len: f.len(),
                    frame: parse(f),
                };
                if !hold {
                    self.net.recycle(rx.desc);
                }
                n += 1;
            }
            self.net.flush();
            if let Some(e) = self.net.error() {
                return Err(Fail::Device(e));
            }
            if n > 0 {
                self.inbox.head = 1;
                self.inbox.len = n;
                self.inbox.held = hold;
                return Ok(Next::Frame(self.inbox.events[0]));
            }
            let now = self.clock.now();
            if now >= deadline {
                return Err(Fail::Timeout);
            }
            if now >= until || self.net.tx_in_flight() < tx_before {
                return Ok(Next::Wake);
            }
            if self.net.arm() {
                continue;
            }
            self.clock.arm_until(until.min(deadline));
            crate::abi::wait(seen);
        }
    }

    /// Give held receive buffers back (their frames stay in the inbox).
    fn give_back(&mut self) {
        if core::mem::take(&mut self.inbox.held) {
            for i in 0..self.inbox.len {
                let d = self.inbox.events[i].desc;
                self.net.recycle(d);
            }
            self.net.flush();
        }
    }

    /// Sleep until `t`, or until `done(frames in the transmit ring)`; the
    /// receive ring is left alone (its frames are for later). Timeout at
    /// `deadline`.
    fn wait_tx(&mut self, t: u64, deadline: u64, done: impl Fn(usize) -> bool) -> Result<(), Fail> {
        loop {
            let seen = irq_total();
            self.net.service();
            if let Some(e) = self.net.error() {
                return Err(Fail::Device(e));
            }
            if done(self.net.tx_in_flight()) {
                return Ok(());
            }
            let now = self.clock.now();
            if now >= t {
                return Ok(());
            }
            if now >= deadline {
                return Err(Fail::Timeout);
            }
            if self.net.arm_tx() {
                continue;
            }
            self.clock.arm_until(t.min(deadline));
            crate::abi::wait(seen);
        }
    }

    /// Sleep until `t` without taking frames.
    fn sleep_until(&mut self, t: u64) -> Result<(), Fail> {
        self.wait_tx(t, u64::MAX, |_| false)
    }

    /// Wait until every queued frame has been transmitted.
    fn drain(&mut self) -> Result<(), Fail> {
        let deadline = self.now() + DRAIN_NS;
        self.wait_tx(u64::MAX, deadline, |n| n == 0)
            .inspect_err(|e| {
                if let Fail::Timeout = e {
                    say!(
                        "net: timeout: {} frames not transmitted",
                        self.net.tx_in_flight()
                    );
                }
            })
    }

    /// Send `n` frames of `kind` (seq 0..n) to `dst` from `src`.
    fn burst(&mut self, dst: [u8; 6], src: [u8; 6], kind: Kind, n: u32) -> Result<(), Fail> {
        let mut sent = 0u32;
        while sent < n {
            while sent < n && self.send(dst, src, kind, u64::from(sent), BROADCAST_LEN) {
                sent += 1;
            }
            self.net.flush();
            if sent < n {
                // The ring is full: wait for a completion.
                let before = self.net.tx_in_flight();
                let deadline = self.now() + PROGRESS_NS;
                self.wait_tx(u64::MAX, deadline, |n| n < before)
                    .inspect_err(|e| {
                        if let Fail::Timeout = e {
                            say!("net: timeout: transmit ring stuck after {sent} frames");
                        }
                    })?;
            }
        }
        self.drain()
    }

    /// Send hellos to `peer` until it answers with an ack.
    fn find_peer(&mut self, peer: [u8; 6]) -> Result<(), Fail> {
        let deadline = self.now() + PEER_NS;
        let mut next_hello = self.now();
        loop {
            if self.now() >= next_hello {
                let me = self.mac();
                self.send(peer, me, Kind::Hello, 0, SMALL_LEN);
                self.net.flush();
                next_hello = self.now() + HELLO_NS;
            }
            let next = self
                .next_event(next_hello, deadline, false)
                .inspect_err(|e| {
                    if let Fail::Timeout = e {
                        say!("net: no answer from {}", Mac(peer));
                    }
                })?;
            if let Next::Frame(e) = next {
                if e.ours(Kind::Ack, Some(peer)).is_some() {
                    return Ok(());
                }
            }
        }
    }
}

/// The selected device, its live driver and its inbox.
pub struct NetState {
    selected: usize,
    net: Option<Net>,
    inbox: Inbox,
}

impl NetState {
    /// No device initialised yet.
    pub fn new() -> NetState {
        NetState {
            selected: 0,
            net: None,
            inbox: Inbox::new(),
        }
    }

    fn device(&mut self, boot: &Boot, devices: &Devices) -> Result<(), u32> {
        if self.net.is_none() {
            let Some(t) = devices.device(DEVICE_NET, self.selected) else {
                say!("net: no usable virtio-net device");
                return Err(EXIT_NO_DEVICE);
            };
            self.inbox.clear();
            self.net = Some(init(boot, t)?);
        }
        Ok(())
    }

    /// Run one `net=` word. `Err(code)` is the exit code of its failure
    /// (already reported).
    pub fn run(&mut self, boot: &Boot, devices: &Devices, word: NetWord) -> Result<(), u32> {
        if let NetWord::Use { index } = word {
            self.net = None;
            self.inbox.clear();
            self.selected = index as usize;
            return match devices.device(DEVICE_NET, self.selected) {
                Some(t) => {
                    say!("net: using device {index} at 0x{:08x}", t.base);
                    Ok(())
                }
                None => {
                    say!("net: no virtio-net device {index}");
                    Err(EXIT_NO_DEVICE)
                }
            };
        }
        let fresh = self.net.is_none();
        self.device(boot, devices)?;
        let Some(net) = self.net.as_mut() else {
            return Err(EXIT_INIT);
        };
        let mut link = Link {
            net,
            clock: Clock::start(),
            inbox: &mut self.inbox,
        };
        let result = match word {
            NetWord::Mac if !fresh => {
                say_ready(link.net);
                Ok(())
            }
            NetWord::Mac | NetWord::Use { .. } => Ok(()),
            NetWord::Send {
                peer,
                frames,
                size,
                window,
            } => send(&mut link, peer, frames, size as usize, u64::from(window)),
            NetWord::Recv { frames, delay_us } => recv(&mut link, frames, delay_us),
            NetWord::ExpectNone { ms } => expect_none(&mut link, ms),
            NetWord::Spoof { frames } => link
                .burst(BROADCAST, SPOOF_SOURCE, Kind::Spoof, frames)
                .map(|()| say!("net: spoofed {frames} frames"))
                .map_err(Stop::Fail),
            NetWord::Broadcast { frames } => {
                let me = link.mac();
                link.burst(BROADCAST, me, Kind::Broadcast, frames)
                    .map(|()| say!("net: broadcast {frames} frames"))
                    .map_err(Stop::Fail)
            }
            NetWord::Ping { peer, rounds } => ping(&mut link, peer, rounds),
            NetWord::Pong { rounds } => pong(&mut link, rounds),
            NetWord::RecvAny { frames, ethertype } => recv_any(&mut link, frames, ethertype),
            NetWord::BadTx => bad_tx(&mut link),
        };
        // Every word ends with its frames out of the guest.
        let result = result.and_then(|()| link.drain().map_err(Stop::Fail));
        link.give_back();
        let code = match result {
            Ok(()) => return Ok(()),
            Err(Stop::Reset) => 0,
            Err(Stop::Fail(Fail::Timeout)) => EXIT_TIMEOUT,
            Err(Stop::Fail(Fail::Device(DeviceError::NeedsReset))) => {
                say!("net: device needs reset");
                EXIT_DEVICE
            }
            Err(Stop::Fail(Fail::Device(DeviceError::UnknownBuffer(q)))) => {
                say!("net: device returned a buffer that was not posted (queue {q})");
                EXIT_DEVICE
            }
            Err(Stop::Verify) => {
                // The device is fine; keep it.
                return Err(EXIT_VERIFY);
            }
        };
        drop(link);
        // Frames may still be queued or the device be broken: reset it
        // (drop); the next word initialises it again.
        self.net = None;
        self.inbox.clear();
        match code {
            0 => Ok(()),
            c => Err(c),
        }
    }
}

fn init(boot: &Boot, t: Transport) -> Result<Net, u32> {
    if !boot.route_gsi(t.gsi, VEC_VIRTIO) {
        say!("net: init failed: gsi {} is on no IOAPIC", t.gsi);
        return Err(EXIT_INIT);
    }
    let net = Net::init(t).map_err(|e| {
        say!("net: init failed: {}", e.describe("network"));
        EXIT_INIT
    })?;
    say_ready(&net);
    Ok(net)
}

fn say_ready(net: &Net) {
    say!(
        "net: ready mac={} queue={} features=0x{:016x}",
        Mac(net.mac),
        net.rx_size(),
        net.features
    );
    if net.tx_size() != net.rx_size() {
        say!("net: transmit queue={}", net.tx_size());
    }
}

/// How a word ended early.
enum Stop {
    Fail(Fail),
    /// `recv` finished but saw loss or damage (already reported).
    Verify,
    /// Not a failure, but the device must be reset (`bad-tx`).
    Reset,
}

impl From<Fail> for Stop {
    fn from(f: Fail) -> Stop {
        Stop::Fail(f)
    }
}

fn send(link: &mut Link, peer: [u8; 6], frames: u32, size: usize, window: u64) -> Result<(), Stop> {
    link.find_peer(peer)?;
    let me = link.mac();
    let n = u64::from(frames);
    let t0 = link.now();
    let (mut next, mut acked, mut pokes) = (0u64, 0u64, 0u32);
    let mut deadline = t0 + PROGRESS_NS;
    let mut poke_at = t0 + POKE_NS;
    while acked < n {
        while next < n && next - acked < window && link.send(peer, me, Kind::Data, next, size) {
            next += 1;
        }
        link.net.flush();
        let got = link.next_event(poke_at, deadline, false).inspect_err(|e| {
            if let Fail::Timeout = e {
                say!("net: timeout: sent {next} acked {acked}");
            }
        })?;
        match got {
            Next::Frame(e) => {
                if let Some(f) = e.ours(Kind::Ack, Some(peer)) {
                    if f.seq > acked && f.seq <= next {
                        acked = f.seq;
                        let now = link.now();
                        deadline = now + PROGRESS_NS;
                        poke_at = now + POKE_NS;
                    }
                }
            }
            Next::Wake if link.now() >= poke_at => {
                // Acks stalled: ask the receiver to repeat its last one.
                link.send(peer, me, Kind::Hello, next, SMALL_LEN);
                link.net.flush();
                pokes += 1;
                poke_at = link.now() + POKE_NS;
            }
            Next::Wake => {}
        }
    }
    let us = (link.now() - t0) / 1000;
    say!("net: sent {frames} frames");
    say!("net: send {frames} frames {size} bytes in {us} us");
    if pokes > 0 {
        say!("net: acks solicited {pokes} times");
    }
    Ok(())
}

fn recv(link: &mut Link, frames: u32, delay_us: u32) -> Result<(), Stop> {
    let hold = delay_us > 0;
    let mut t = SeqTracker::new(u64::from(frames));
    let (mut last_ack, mut max_ahead) = (0u64, 0u64);
    let mut peer: Option<[u8; 6]> = None;
    let mut deadline = link.now() + PEER_NS;
    let me = link.mac();
    while !t.done() {
        let got = link.next_event(deadline, deadline, hold).inspect_err(|e| {
            if let Fail::Timeout = e {
                say!("net: timeout: received {} of {frames} data frames", t.ok);
            }
        })?;
        if let Next::Frame(Event { frame: Ok(f), .. }) = got {
            match f.kind {
                Kind::Hello if f.intact => {
                    // Only what was already acknowledged: an ack means the
                    // buffers are free again.
                    link.send(f.src, me, Kind::Ack, last_ack, SMALL_LEN);
                }
                Kind::Data => {
                    deadline = link.now() + PROGRESS_NS;
                    peer.get_or_insert(f.src);
                    max_ahead = max_ahead.max(f.seq.saturating_sub(last_ack));
                    t.on_data(f.seq, f.intact);
                }
                _ => {}
            }
        }
        // After each batch (or the last frame): give the buffers back,
        // then acknowledge.
        if link.batch_done() || t.done() {
            if hold && link.inbox.held {
                let until = link.now() + u64::from(delay_us) * 1000;
                link.sleep_until(until)?;
                link.give_back();
            }
            if let Some(p) = peer {
                if t.next > last_ack {
                    link.send(p, me, Kind::Ack, t.next, SMALL_LEN);
                    last_ack = t.next;
                }
            }
            link.net.flush();
        }
    }
    link.drain()?;
    say!(
        "net: received {} frames ok lost={} bad={} dup={}",
        t.ok,
        t.lost,
        t.bad,
        t.dup
    );
    say!("net: window max_ahead={max_ahead}");
    if !t.perfect() {
        return Err(Stop::Verify);
    }
    Ok(())
}

fn expect_none(link: &mut Link, ms: u32) -> Result<(), Stop> {
    let end = link.now() + u64::from(ms) * 1_000_000;
    let mut count = 0u32;
    loop {
        match link.next_event(end, u64::MAX, false)? {
            Next::Frame(e) => {
                if count < SHOW_MAX {
                    e.show();
                }
                count += 1;
            }
            Next::Wake if link.now() >= end => break,
            Next::Wake => {}
        }
    }
    say!("net: received {count} frames");
    Ok(())
}

fn recv_any(link: &mut Link, frames: u32, only: Option<u16>) -> Result<(), Stop> {
    let (mut count, mut ignored) = (0u32, 0u32);
    let mut deadline = link.now() + ANY_NS;
    while count < frames {
        let got = link
            .next_event(deadline, deadline, false)
            .inspect_err(|e| {
                if let Fail::Timeout = e {
                    say!("net: timeout: received {count} of {frames} frames");
                }
            })?;
        if let Next::Frame(e) = got {
            if only.is_some_and(|t| t != e.ethertype) {
                ignored += 1;
            } else {
                e.show();
                count += 1;
                deadline = link.now() + ANY_NS;
            }
        }
    }
    say!("net: received {count} frames");
    if ignored > 0 {
        say!("net: ignored {ignored} frames of other ethertypes");
    }
    Ok(())
}

fn ping(link: &mut Link, peer: [u8; 6], rounds: u32) -> Result<(), Stop> {
    link.find_peer(peer)?;
    let me = link.mac();
    let t0 = link.now();
    for i in 0..u64::from(rounds) {
        if !link.send(peer, me, Kind::Ping, i, SMALL_LEN) {
            link.drain()?;
            link.send(peer, me, Kind::Ping, i, SMALL_LEN);
        }
        link.net.flush();
        let deadline = link.now() + PROGRESS_NS;
        loop {
            let got = link
                .next_event(deadline, deadline, false)
                .inspect_err(|e| {
                    if let Fail::Timeout = e {
                        say!("net: timeout: round trip {i}");
                    }
                })?;
            if let Next::Frame(e) = got {
                if e.ours(Kind::Pong, Some(peer)).is_some_and(|f| f.seq == i) {
                    break;
                }
            }
        }
    }
    let us = (link.now() - t0) / 1000;
    say!("net: rtt {rounds} round trips in {us} us");
    Ok(())
}

fn pong(link: &mut Link, rounds: u32) -> Result<(), Stop> {
    let me = link.mac();
    let mut count = 0u32;
    let mut deadline = link.now() + PEER_NS;
    while count < rounds {
        let got = link
            .next_event(deadline, deadline, false)
            .inspect_err(|e| {
                if let Fail::Timeout = e {
                    say!("net: timeout: ponged {count} of {rounds}");
                }
            })?;
        if let Next::Frame(e) = got {
            if let Some(f) = e.ours(Kind::Hello, None) {
                link.send(f.src, me, Kind::Ack, 0, SMALL_LEN);
            } else if let Some(f) = e.ours(Kind::Ping, None) {
                link.send(f.src, me, Kind::Pong, f.seq, SMALL_LEN);
                count += 1;
                deadline = link.now() + PROGRESS_NS;
            }
            if link.batch_done() {
                link.net.flush();
            }
        }
    }
    link.net.flush();
    link.drain()?;
    say!("net: ponged {rounds} round trips");
    Ok(())
}

fn bad_tx(link: &mut Link) -> Result<(), Stop> {
    if !link.net.send_truncated(BAD_TX_BYTES) {
        link.drain()?;
        link.net.send_truncated(BAD_TX_BYTES);
    }
    link.net.flush();
    let deadline = link.now() + BAD_NS;
    match link.wait_tx(u64::MAX, deadline, |n| n == 0) {
        Ok(()) => {
            say!("net: bad-tx completed");
            Ok(())
        }
        Err(Fail::Device(DeviceError::NeedsReset)) => {
            say!("net: bad-tx needs-reset");
            Err(Stop::Reset)
        }
        Err(Fail::Device(DeviceError::UnknownBuffer(q))) => {
            say!("net: device returned a buffer that was not posted (queue {q})");
            Err(Stop::Fail(Fail::Device(DeviceError::UnknownBuffer(q))))
        }
        Err(Fail::Timeout) => {
            say!("net: timeout: bad-tx not completed");
            Err(Stop::Fail(Fail::Timeout))
        }
    }
}
