//! The test guest's Ethernet frames (`net=` words). Pure `core` code,
//! compiled by the guest and by the host crate
//! (`partvisor_test_guest::net_frame`), so a host test can build a frame to
//! write into a TAP device and check the frames a guest sends.
//!
//! A frame is `len` bytes (60..=1514, no FCS):
//!
//! | bytes | field |
//! |---|---|
//! | `[0, 6)` | destination MAC |
//! | `[6, 12)` | source MAC |
//! | `[12, 14)` | ethertype [`ETHERTYPE`] (0x88b5, big-endian) |
//! | `[14, 18)` | [`MAGIC`] `"PVNF"` |
//! | `[18]` | [`Kind`] |
//! | `[19]` | 0 |
//! | `[20, 22)` | `len` (u16 LE, the whole frame) |
//! | `[22, 24)` | 0 |
//! | `[24, 32)` | sequence number (u64 LE) |
//! | `[32, len - 8)` | filler: splitmix64 seeded with `seq ^ kind << 56` |
//! | `[len - 8, len)` | FNV-1a 64 of bytes `[14, len - 8)` (LE) |
//!
//! The checksum covers everything after the Ethernet header, so a frame
//! whose source MAC was rewritten still verifies; [`parse`] also recomputes
//! the filler, so any changed byte is found.

use crate::blk_pattern::fnv1a64;

/// IEEE 802 "local experimental ethertype 1".
pub const ETHERTYPE: u16 = 0x88b5;
/// First payload bytes of every frame.
pub const MAGIC: [u8; 4] = *b"PVNF";
/// Shortest frame (Ethernet minimum without FCS).
pub const MIN_LEN: usize = 60;
/// Longest frame (1500-byte MTU + 14-byte header).
pub const MAX_LEN: usize = 1514;
/// Length of ack, hello, ping and pong frames.
pub const SMALL_LEN: usize = 64;
/// Length of `net=broadcast` and `net=spoof` frames.
pub const BROADCAST_LEN: usize = 100;
/// Destination of broadcast and spoofed frames.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Source MAC of `net=spoof` frames (locally administered, "de:ad:be:ef").
pub const SPOOF_SOURCE: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];

const HEADER: usize = 32;
const SUM: usize = 8;

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `net=send` payload; seq = 0, 1, 2, ...
    Data = 1,
    /// Cumulative acknowledgement: seq = data frames received in order.
    Ack = 2,
    /// Sender/pinger looking for its peer (answered with an [`Kind::Ack`]).
    Hello = 3,
    /// Round-trip request (seq = round trip).
    Ping = 4,
    /// Round-trip answer (same seq as the ping).
    Pong = 5,
    /// `net=broadcast` frame (seq = 0, 1, ...).
    Broadcast = 6,
    /// `net=spoof` frame (seq = 0, 1, ...), source [`SPOOF_SOURCE`].
    Spoof = 7,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [
        Kind::Data,
        Kind::Ack,
        Kind::Hello,
        Kind::Ping,
        Kind::Pong,
        Kind::Broadcast,
        Kind::Spoof,
    ];

    /// Lower-case name (report lines).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Ack => "ack",
            Kind::Hello => "hello",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::Broadcast => "broadcast",
            Kind::Spoof => "spoof",
        }
    }

    fn from_u8(v: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == v)
    }
}

/// What [`parse`] found in a frame of this format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// Frame kind.
    pub kind: Kind,
    /// Sequence number.
    pub seq: u64,
    /// Frame length (bytes, as the header says and as received).
    pub len: usize,
    /// Checksum and filler are exactly right.
    pub intact: bool,
}

/// Why [`parse`] did not recognise a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOurs {
    /// Shorter than [`MIN_LEN`] or longer than [`MAX_LEN`].
    Length,
    /// Another ethertype.
    Ethertype(u16),
    /// Our ethertype without our magic, kind or length fields.
    Header,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(kind: Kind, seq: u64, out: &mut [u8]) {
    let mut state = seq ^ (kind as u64) << 56;
    for chunk in out.chunks_mut(8) {
        let v = splitmix64(&mut state).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn filler_ok(kind: Kind, seq: u64, data: &[u8]) -> bool {
    let mut state = seq ^ (kind as u64) << 56;
    data.chunks(8)
        .all(|chunk| splitmix64(&mut state).to_le_bytes()[..chunk.len()] == *chunk)
}

/// The ethertype of an Ethernet frame (0 if it is too short to have one).
pub fn ethertype(frame: &[u8]) -> u16 {
    match frame {
        [_, _, _, _, _, _, _, _, _, _, _, _, hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 0,
    }
}

/// Write a `len`-byte frame into `out[..len]`; returns `len`, or `None` if
/// `len` is outside [`MIN_LEN`]..=[`MAX_LEN`] or `out` is shorter.
pub fn build(
    out: &mut [u8],
    dst: [u8; 6],
    src: [u8; 6],
    kind: Kind,
    seq: u64,
    len: usize,
) -> Option<usize> {
    if !(MIN_LEN..=MAX_LEN).contains(&len) || out.len() < len {
        return None;
    }
    let f = &mut out[..len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&MAGIC);
    f[18] = kind as u8;
    f[19] = 0;
    f[20..22].copy_from_slice(&(len as u16).to_le_bytes());
    f[22..24].copy_from_slice(&[0, 0]);
    f[24..32].copy_from_slice(&seq.to_le_bytes());
    fill(kind, seq, &mut f[HEADER..len - SUM]);
    let sum = fnv1a64(&f[14..len - SUM]);
    f[len - SUM..].copy_from_slice(&sum.to_le_bytes());
    Some(len)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Recognise a frame of this format. A frame with the right ethertype,
/// magic, kind and length field but a wrong checksum or filler is `Ok` with
/// `intact: false` (so a receiver can count it as damaged rather than
/// foreign).
pub fn parse(frame: &[u8]) -> Result<Frame, NotOurs> {
    let len = frame.len();
    if !(MIN_LEN..=MAX_LEN).contains(&len) {
        return Err(NotOurs::Length);
    }
    let et = ethertype(frame);
    if et != ETHERTYPE {
        return Err(NotOurs::Ethertype(et));
    }
    let kind = Kind::from_u8(frame[18]).ok_or(NotOurs::Header)?;
    if frame[14..18] != MAGIC || usize::from(u16::from_le_bytes([frame[20], frame[21]])) != len {
        return Err(NotOurs::Header);
    }
    let seq = u64_at(frame, 24);
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&frame[0..6]);
    src.copy_from_slice(&frame[6..12]);
    let intact = u64_at(frame, len - SUM) == fnv1a64(&frame[14..len - SUM])
        && frame[19] == 0
        && frame[22..24] == [0, 0]
        && filler_ok(kind, seq, &frame[HEADER..len - SUM]);
    Ok(Frame {
        dst,
        src,
        kind,
        seq,
        len,
        intact,
    })
}

/// Parse `xx:xx:xx:xx:xx:xx` (or with `-`), two hex digits per octet.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let mut mac = [0u8; 6];
    let mut parts = s.split(sep);
    for m in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Displays a MAC as `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A receiver's account of data frames `0..expected` (`net=recv`): counts
/// and the next sequence number it waits for (= its cumulative ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqTracker {
    /// Frames expected.
    pub expected: u64,
    /// Next sequence number wanted; every lower one was received or lost.
    pub next: u64,
    /// Intact frames that advanced the sequence.
    pub ok: u64,
    /// Sequence numbers skipped (never seen before a higher one arrived).
    pub lost: u64,
    /// Damaged frames, and frames numbered `expected` or higher.
    pub bad: u64,
    /// Intact frames whose number was already passed.
    pub dup: u64,
}

impl SeqTracker {
    /// Waiting for `expected` frames.
    pub fn new(expected: u64) -> SeqTracker {
        SeqTracker {
            expected,
            ..SeqTracker::default()
        }
    }

    /// Account for data frame `seq`. A damaged frame is `bad`; its number is
    /// not trusted, except that a damaged frame carrying exactly the next
    /// number takes that number's place (so it is not also counted lost).
    pub fn on_data(&mut self, seq: u64, intact: bool) {
        if !intact || seq >= self.expected {
            self.bad += 1;
            if seq == self.next && seq < self.expected {
                self.next += 1;
            }
        } else if seq >= self.next {
            self.lost += seq - self.next;
            self.next = seq + 1;
            self.ok += 1;
        } else {
            self.dup += 1;
        }
    }

    /// Every expected number has been accounted for.
    pub fn done(&self) -> bool {
        self.next >= self.expected
    }

    /// All frames arrived intact, once each, none missing.
    pub fn perfect(&self) -> bool {
        self.ok == self.expected && self.lost == 0 && self.bad == 0 && self.dup == 0
    }
}
