//! Parsers for the virtio cmdline words. Pure `core` code: the host crate
//! compiles this same file (`partvisor_test_guest::words`) to unit-test it
//! and to build words, so the guest and its tests cannot disagree.

/// A `virtio_mmio.device=<size>@<base>:<gsi>[:<id>]` declaration (Linux's
/// syntax; `<size>` and `<base>` take `0x` hex or decimal with an optional
/// K/M/G suffix, `<gsi>` is decimal, the optional platform-device id is
/// ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDecl {
    /// Register window size in bytes.
    pub size: u64,
    /// Guest-physical base of the registers.
    pub base: u64,
    /// Interrupt (global system interrupt = IOAPIC input).
    pub gsi: u32,
}

/// Cmdline key of a device declaration.
pub const VIRTIO_MMIO_KEY: &str = "virtio_mmio.device";
/// Cmdline key of the virtio-blk actions.
pub const BLK_KEY: &str = "blk";
/// Cmdline key of the virtio-net actions.
pub const NET_KEY: &str = "net";

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A number with an optional binary K/M/G suffix (Linux `memparse`).
pub fn memparse(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    number(digits)?.checked_mul(1 << shift)
}

/// Parse the value of a `virtio_mmio.device=` word.
pub fn parse_virtio_mmio(value: &str) -> Option<VirtioMmioDecl> {
    let (size, rest) = value.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let gsi = match rest.split_once(':') {
        Some((gsi, id)) => {
            id.parse::<u32>().ok()?;
            gsi
        }
        None => rest,
    };
    let decl = VirtioMmioDecl {
        size: memparse(size)?,
        base: memparse(base)?,
        gsi: gsi.parse().ok()?,
    };
    (decl.size >= 0x100 && decl.base.checked_add(decl.size).is_some()).then_some(decl)
}

/// Malformed requests `blk=bad:<kind>` posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// Two descriptors whose `next` fields point at each other.
    Loop,
    /// A chain longer than the queue: an indirect table of twice the queue
    /// size when VIRTIO_RING_F_INDIRECT_DESC is negotiated, else every ring
    /// descriptor once with the last linking back to the first.
    Long,
    /// An indirect descriptor whose table length is not a multiple of 16
    /// and whose first entry is itself indirect.
    Indirect,
    /// A data descriptor at 1 TiB, outside guest RAM.
    Oob,
    /// A read request with no device-writable descriptor (no status byte).
    NoStatus,
}

impl BadKind {
    /// Every kind, in documentation order.
    pub const ALL: [BadKind; 5] = [
        BadKind::Loop,
        BadKind::Long,
        BadKind::Indirect,
        BadKind::Oob,
        BadKind::NoStatus,
    ];

    /// The word's spelling (`blk=bad:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            BadKind::Loop => "loop",
            BadKind::Long => "long",
            BadKind::Indirect => "indirect",
            BadKind::Oob => "oob",
            BadKind::NoStatus => "nostatus",
        }
    }
}

/// `blk=bench:<kind>:<ops>` workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchKind {
    /// 4 KiB reads at random 4 KiB-aligned offsets.
    RandRead,
    /// 4 KiB writes at random 4 KiB-aligned offsets.
    RandWrite,
    /// 64 KiB reads, consecutive from sector 0 (wrapping at the capacity).
    SeqRead,
}

impl BenchKind {
    /// The word's spelling.
    pub fn name(self) -> &'static str {
        match self {
            BenchKind::RandRead => "randread",
            BenchKind::RandWrite => "randwrite",
            BenchKind::SeqRead => "seqread",
        }
    }

    /// Bytes per request.
    pub fn request_bytes(self) -> u32 {
        match self {
            BenchKind::RandRead | BenchKind::RandWrite => 4096,
            BenchKind::SeqRead => 65536,
        }
    }
}

/// One `blk=` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkWord {
    /// `blk=write:SEED:N`
    Write {
        /// Pattern seed.
        seed: u64,
        /// 4 KiB blocks from sector 0.
        blocks: u32,
    },
    /// `blk=verify:SEED:N`
    Verify {
        /// Pattern seed.
        seed: u64,
        /// 4 KiB blocks from sector 0.
        blocks: u32,
    },
    /// `blk=id`
    Id,
    /// `blk=expect-ro`
    ExpectRo,
    /// `blk=bad:KIND`
    Bad(BadKind),
    /// `blk=bench:KIND:OPS[:DEPTH]`
    Bench {
        /// Workload.
        kind: BenchKind,
        /// Requests to complete.
        ops: u32,
        /// Requests in flight at most (1..=[`MAX_DEPTH`], default
        /// [`MAX_DEPTH`]).
        depth: u32,
    },
    /// `blk=use:N`: the following words drive the N-th (from 0) declared
    /// virtio-blk device.
    Use {
        /// Index among the declared block devices.
        index: u32,
    },
}

/// Most requests the driver keeps in flight.
pub const MAX_DEPTH: u32 = 16;

/// Parse the value of a `blk=` word (SEED: decimal or `0x` hex).
pub fn parse_blk(value: &str) -> Option<BlkWord> {
    let mut parts = value.split(':');
    let op = parts.next()?;
    let a = parts.next();
    let b = parts.next();
    let c = parts.next();
    if parts.next().is_some() || (c.is_some() && op != "bench") {
        return None;
    }
    let word = match (op, a, b) {
        ("write", Some(seed), Some(n)) => BlkWord::Write {
            seed: number(seed)?,
            blocks: n.parse().ok()?,
        },
        ("verify", Some(seed), Some(n)) => BlkWord::Verify {
            seed: number(seed)?,
            blocks: n.parse().ok()?,
        },
        ("id", None, None) => BlkWord::Id,
        ("expect-ro", None, None) => BlkWord::ExpectRo,
        ("bad", Some(kind), None) => BlkWord::Bad(*BadKind::ALL.iter().find(|k| k.name() == kind)?),
        ("bench", Some(kind), Some(n)) => BlkWord::Bench {
            kind: [
                BenchKind::RandRead,
                BenchKind::RandWrite,
                BenchKind::SeqRead,
            ]
            .into_iter()
            .find(|k| k.name() == kind)?,
            ops: n.parse().ok()?,
            depth: match c {
                None => MAX_DEPTH,
                Some(d) => Some(d.parse().ok()?).filter(|d| (1..=MAX_DEPTH).contains(d))?,
            },
        },
        ("use", Some(n), None) => BlkWord::Use {
            index: n.parse().ok()?,
        },
        _ => return None,
    };
    Some(word)
}

/// Default `net=send` window (frames sent and not yet acknowledged).
pub const DEFAULT_WINDOW: u32 = 32;
/// Largest `net=send` window (it must stay below the receiver's ring).
pub const MAX_WINDOW: u32 = 128;
/// Longest `net=expect-none` listen.
pub const MAX_LISTEN_MS: u32 = 600_000;
/// Longest `net=recv` slow-receiver delay.
pub const MAX_DELAY_US: u32 = 1_000_000;

/// One `net=` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetWord {
    /// `net=mac`: initialise the device, print its MAC.
    Mac,
    /// `net=use:N`: later words drive the N-th declared virtio-net device.
    Use {
        /// Index among the declared net devices.
        index: u32,
    },
    /// `net=send:PEER_MAC:N:SIZE[:W]`
    Send {
        /// Receiver's MAC.
        peer: [u8; 6],
        /// Data frames.
        frames: u32,
        /// Bytes per frame (60..=1514).
        size: u32,
        /// Frames unacknowledged at most (1..=[`MAX_WINDOW`]).
        window: u32,
    },
    /// `net=recv:N[:DELAY_US]`
    Recv {
        /// Data frames to receive.
        frames: u32,
        /// Slow receiver: hold each batch of buffers this long before
        /// giving them back to the device (and acknowledging).
        delay_us: u32,
    },
    /// `net=expect-none:MS`
    ExpectNone {
        /// How long to listen.
        ms: u32,
    },
    /// `net=spoof:N`
    Spoof {
        /// Frames to send.
        frames: u32,
    },
    /// `net=ping:PEER_MAC:N`
    Ping {
        /// The `net=pong` guest's MAC.
        peer: [u8; 6],
        /// Round trips.
        rounds: u32,
    },
    /// `net=pong:N`
    Pong {
        /// Round trips to answer.
        rounds: u32,
    },
    /// `net=recv-any:N[:ETHERTYPE]`
    RecvAny {
        /// Frames to print.
        frames: u32,
        /// Only frames of this ethertype count (others are ignored).
        ethertype: Option<u16>,
    },
    /// `net=bad-tx`: one transmit buffer shorter than its 12-byte header.
    BadTx,
    /// `net=broadcast:N`
    Broadcast {
        /// Frames to send.
        frames: u32,
    },
}

/// Parse the value of a `net=` word (ETHERTYPE: `0x` hex or decimal). MACs are `xx:xx:xx:xx:xx:xx` (their
/// colons are part of the word) or `xx-xx-xx-xx-xx-xx`.
pub fn parse_net(value: &str) -> Option<NetWord> {
    let (op, rest) = match value.split_once(':') {
        Some((op, rest)) => (op, Some(rest)),
        None => (value, None),
    };
    // A leading MAC: 17 characters.
    fn with_mac(rest: Option<&str>) -> Option<([u8; 6], &str)> {
        let rest = rest?;
        let mac = crate::net_frame::parse_mac(rest.get(..17)?)?;
        Some((mac, rest.get(17..)?.strip_prefix(':')?))
    }
    let mut nums = [0u32; 3];
    let count = |s: &str, nums: &mut [u32; 3]| -> Option<usize> {
        let mut n = 0;
        for part in s.split(':') {
            *nums.get_mut(n)? = part.parse().ok()?;
            n += 1;
        }
        Some(n)
    };
    let word = match op {
        "mac" if rest.is_none() => NetWord::Mac,
        "bad-tx" if rest.is_none() => NetWord::BadTx,
        "use" => match count(rest?, &mut nums)? {
            1 => NetWord::Use { index: nums[0] },
            _ => return None,
        },
        "send" => {
            let (peer, tail) = with_mac(rest)?;
            let n = count(tail, &mut nums)?;
            let window = match n {
                2 => DEFAULT_WINDOW,
                3 => nums[2],
                _ => return None,
            };
            let size = nums[1];
            let len_ok =
                (crate::net_frame::MIN_LEN..=crate::net_frame::MAX_LEN).contains(&(size as usize));
            if !len_ok || !(1..=MAX_WINDOW).contains(&window) {
                return None;
            }
            NetWord::Send {
                peer,
                frames: nums[0],
                size,
                window,
            }
        }
        "recv" => match count(rest?, &mut nums)? {
            1 => NetWord::Recv {
                frames: nums[0],
                delay_us: 0,
            },
            2 if nums[1] <= MAX_DELAY_US => NetWord::Recv {
                frames: nums[0],
                delay_us: nums[1],
            },
            _ => return None,
        },
        "recv-any" => {
            let rest = rest?;
            let (n, et) = match rest.split_once(':') {
                Some((n, et)) => (n, Some(u16::try_from(number(et)?).ok()?)),
                None => (rest, None),
            };
            NetWord::RecvAny {
                frames: n.parse().ok()?,
                ethertype: et,
            }
        }
        "ping" => {
            let (peer, tail) = with_mac(rest)?;
            match count(tail, &mut nums)? {
                1 => NetWord::Ping {
                    peer,
                    rounds: nums[0],
                },
                _ => return None,
            }
        }
        _ => {
            let n = count(rest?, &mut nums)?;
            if n != 1 {
                return None;
            }
            let v = nums[0];
            match op {
                "expect-none" if v <= MAX_LISTEN_MS => NetWord::ExpectNone { ms: v },
                "spoof" => NetWord::Spoof { frames: v },
                "pong" => NetWord::Pong { rounds: v },
                "broadcast" => NetWord::Broadcast { frames: v },
                _ => return None,
            }
        }
    };
    Some(word)
}

/// Cmdline key of the virtio-vsock actions.
pub const VSOCK_KEY: &str = "vsock";

/// One `vsock=` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockWord {
    /// `vsock=cid`: initialise the device, print its CID.
    Cid,
    /// `vsock=listen:PORT:RECV[:SEND]`: accept one connection on PORT,
    /// receive RECV bytes of the test pattern (verifying every byte) while
    /// sending SEND bytes of it (default 0), both directions at once.
    Listen {
        /// Port listened on.
        port: u32,
        /// Bytes to receive.
        recv: u64,
        /// Bytes to send.
        send: u64,
    },
    /// `vsock=send:CID:PORT:SEND[:RECV[:PACKET]]`: connect to CID:PORT,
    /// send SEND bytes of the test pattern within the peer's credit, in
    /// packets of at most PACKET bytes (default and largest
    /// [`MAX_VSOCK_PACKET`]), while receiving and verifying RECV bytes
    /// (default 0).
    Send {
        /// Peer CID.
        cid: u64,
        /// Peer port.
        port: u32,
        /// Bytes to send.
        send: u64,
        /// Bytes to receive.
        recv: u64,
        /// Largest payload of one packet.
        packet: u32,
    },
    /// `vsock=echo:PORT`: accept one connection on PORT and send back
    /// every byte it receives until the peer shuts it down.
    Echo {
        /// Port listened on.
        port: u32,
    },
    /// `vsock=ping:CID:PORT:COUNT:SIZE`: connect to an echo at CID:PORT and
    /// time COUNT round trips of SIZE bytes (at most [`MAX_PINGS`] and
    /// [`MAX_PING_SIZE`]); prints p50 and p99.
    Ping {
        /// Peer CID.
        cid: u64,
        /// Peer port.
        port: u32,
        /// Round trips.
        count: u32,
        /// Bytes per message.
        size: u32,
    },
}

/// Largest payload of one transmitted vsock packet (what Linux sends for
/// a 64 KiB write).
pub const MAX_VSOCK_PACKET: u32 = 64 * 1024;
/// Most round trips one `vsock=ping` word times.
pub const MAX_PINGS: u32 = 2048;
/// Largest `vsock=ping` message (one packet).
pub const MAX_PING_SIZE: u32 = 4052;

/// Parse the value of a `vsock=` word.
pub fn parse_vsock(value: &str) -> Option<VsockWord> {
    let mut parts = value.split(':');
    let op = parts.next()?;
    // Numbers after the op: up to five, each a size (`64K`, `1G`, ...).
    let mut n = [None; 5];
    let mut count = 0;
    for p in parts {
        *n.get_mut(count)? = Some(memparse(p)?);
        count += 1;
    }
    let port = |v: Option<u64>| {
        v.and_then(|v| u32::try_from(v).ok())
            .filter(|p| *p != u32::MAX)
    };
    let in_range = |v: Option<u64>, max: u32| {
        v.and_then(|v| u32::try_from(v).ok())
            .filter(|v| (1..=max).contains(v))
    };
    let word = match (op, count) {
        ("cid", 0) => VsockWord::Cid,
        ("listen", 2 | 3) => VsockWord::Listen {
            port: port(n[0])?,
            recv: n[1]?,
            send: n[2].unwrap_or(0),
        },
        ("send", 3..=5) => VsockWord::Send {
            cid: n[0]?,
            port: port(n[1])?,
            send: n[2]?,
            recv: n[3].unwrap_or(0),
            packet: match n[4] {
                None => MAX_VSOCK_PACKET,
                some => in_range(some, MAX_VSOCK_PACKET)?,
            },
        },
        ("echo", 1) => VsockWord::Echo { port: port(n[0])? },
        ("ping", 4) => VsockWord::Ping {
            cid: n[0]?,
            port: port(n[1])?,
            count: in_range(n[2], MAX_PINGS)?,
            size: in_range(n[3], MAX_PING_SIZE)?,
        },
        _ => return None,
    };
    Some(word)
}

/// Byte `i` of the vsock test stream (so a receiver can check every byte
/// without the sender's help).
pub fn vsock_pattern(i: u64) -> u8 {
    ((i.wrapping_mul(2_654_435_761) >> 13) ^ i) as u8
}
