//! Test-side vhost-user-vsock frontend: a "guest" whose rx (0) and tx (1)
//! queues are laid out as in [`super::net`], and the virtio-vsock header.

use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress};

use super::net::stats;
use super::net::NetDevice;
use super::{guest_memory, pattern, PartIo, SEALED, TIMEOUT};

pub const HDR_LEN: usize = 44;
pub const RX_BUF: u32 = 2048;
/// Receive buffers of the test frontend (`common::net` ring layout).
pub const RX_BUFS: u64 = 0x10_0000;
pub const RX_STRIDE: u64 = 2048;
/// Transmit buffers: our own area, 64 KiB apart.
pub const TX_BUFS: u64 = 0x30_0000;
pub const TX_STRIDE: u64 = 0x1_0000;
pub const QUIET: Duration = Duration::from_millis(200);

pub const REQUEST: u16 = 1;
pub const RESPONSE: u16 = 2;
pub const RST: u16 = 3;
pub const RW: u16 = 5;
pub const SHUTDOWN: u16 = 4;
pub const CREDIT_UPDATE: u16 = 6;
pub const CREDIT_REQUEST: u16 = 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hdr {
    pub src: (u64, u32),
    pub dst: (u64, u32),
    pub len: u32,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    pub fn new(op: u16, src: (u64, u32), dst: (u64, u32)) -> Hdr {
        Hdr {
            src,
            dst,
            len: 0,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src.0.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.src.1.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst.1.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&1u16.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Hdr {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([b[28], b[29]]), 1, "stream type");
        Hdr {
            src: (u64_at(0), u32_at(16)),
            dst: (u64_at(8), u32_at(20)),
            len: u32_at(24),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

pub struct Guest {
    pub dev: NetDevice,
    pub next_tx: u16,
}

impl Guest {
    /// Connects to port `i` of a relay started in `p`'s directory (socket
    /// `p<i>.sock`).
    pub fn attach(p: &PartIo, i: usize) -> Guest {
        Guest::attach_at(&p.dir.path().join(format!("p{i}.sock")))
    }

    /// Connects to the vhost-user socket at `socket`, posts 16 receive
    /// buffers of [`RX_BUF`] bytes.
    pub fn attach_at(socket: &Path) -> Guest {
        let mut dev = NetDevice::connect(socket, guest_memory(SEALED), 16, false).unwrap();
        for id in 0..16 {
            dev.post_rx_len(id, RX_BUF);
        }
        dev.kick(0);
        Guest { dev, next_tx: 0 }
    }

    pub fn config_cid(&mut self) -> u64 {
        let (_, payload) = self
            .dev
            .fe
            .get_config(
                0,
                8,
                vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                &[0; 8],
            )
            .unwrap();
        u64::from_le_bytes(payload.try_into().unwrap())
    }

    /// Sends `h` (with `payload`, whose length goes into `h.len` unless
    /// `len` overrides it) in one descriptor.
    pub fn send_raw(&mut self, h: Hdr, payload: &[u8], len: Option<u32>) {
        while self.dev.pop_used(1).is_some() {}
        let id = self.next_tx % 16;
        self.next_tx += 1;
        self.post(id, h, payload, len);
        self.dev.kick(1);
    }

    /// Writes `h` (its `len` the payload's unless `len` overrides it) and
    /// `payload` into transmit buffer `id`, one descriptor, and makes it
    /// available; the kick is the caller's.
    pub fn post(&mut self, id: u16, mut h: Hdr, payload: &[u8], len: Option<u32>) {
        h.len = len.unwrap_or(payload.len() as u32);
        let addr = TX_BUFS + u64::from(id) * TX_STRIDE;
        self.dev
            .mem
            .write_slice(&h.encode(), GuestAddress(addr))
            .unwrap();
        self.dev
            .mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.dev
            .put_desc(1, id, addr, (HDR_LEN + payload.len()) as u32, 0, 0);
        self.dev.push_avail(1, id);
    }

    pub fn send(&mut self, h: Hdr, payload: &[u8]) {
        self.send_raw(h, payload, None);
    }

    /// The next received packet within `timeout`; reposts its buffer.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<(Hdr, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((id, len)) = self.dev.pop_used(0) {
                assert!(len as usize >= HDR_LEN, "used length {len}");
                let mut buf = vec![0u8; len as usize];
                self.dev
                    .mem
                    .read_slice(&mut buf, GuestAddress(RX_BUFS + u64::from(id) * RX_STRIDE))
                    .unwrap();
                let h = Hdr::decode(&buf);
                assert_eq!(
                    h.len as usize,
                    len as usize - HDR_LEN,
                    "used length = 44 + len"
                );
                self.dev.post_rx_len(id, RX_BUF);
                self.dev.kick(0);
                return Some((h, buf.split_off(HDR_LEN)));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn recv(&mut self) -> (Hdr, Vec<u8>) {
        self.recv_timeout(TIMEOUT).expect("no packet received")
    }

    pub fn expect_nothing(&mut self) {
        if let Some(p) = self.recv_timeout(QUIET) {
            panic!("unexpected packet {:?}", p.0);
        }
    }
}

/// `part-io vsock` with three ports: CIDs 3, 4 and 5 (4 accepts 3 and 5 on
/// port 80, 3 accepts 5 on port 90, nobody else is accepted), sockets
/// `p0..p2.sock` and a stats socket.
pub fn spawn_relay() -> PartIo {
    let dir = tempfile::tempdir().unwrap();
    let port = |i: usize, rest: &str| {
        format!(
            "socket={},{rest}",
            dir.path().join(format!("p{i}.sock")).display()
        )
    };
    let args = vec![
        "vsock".to_string(),
        "--port".into(),
        port(0, "cid=3,accept=5:90"),
        "--port".into(),
        port(1, "cid=4,accept=3:80+5:80"),
        "--port".into(),
        port(2, "cid=5"),
        "--stats-socket".into(),
        dir.path().join("stats.sock").display().to_string(),
    ];
    PartIo::spawn_args(dir, &args, 3)
}

/// Three attached guests whose receive queues the relay knows.
pub fn three_guests(p: &PartIo) -> (Guest, Guest, Guest) {
    let g = (
        Guest::attach(p, 0),
        Guest::attach(p, 1),
        Guest::attach(p, 2),
    );
    let deadline = Instant::now() + TIMEOUT;
    while p.log().matches("vsock receive queue ready").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "receive queues never ready:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    g
}

pub const A: (u64, u32) = (3, 1025);
pub const B: (u64, u32) = (4, 80);

/// Opens A -> B:80 and checks both sides of the handshake.
pub fn connect(a: &mut Guest, b: &mut Guest) {
    a.send(Hdr::new(REQUEST, A, B), &[]);
    let (h, _) = b.recv();
    assert_eq!(h, Hdr::new(REQUEST, A, B));
    b.send(Hdr::new(RESPONSE, B, A), &[]);
    let (h, _) = a.recv();
    assert_eq!(h, Hdr::new(RESPONSE, B, A));
}

/// Counter `name` of the port with CID `cid`.
pub fn stat(p: &PartIo, cid: u64, name: &str) -> u64 {
    let s = stats(p);
    let port = s["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["cid"] == cid)
        .unwrap()
        .clone();
    port[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {port}"))
}

/// The sending and receiving books of one test stream of 16000-byte
/// packets: the sender sends while the receiver's advertised 65536 bytes
/// allow, the receiver checks every byte and gives credit back every 32000.
pub struct Stream {
    from: (u64, u32),
    to: (u64, u32),
    chunk: Vec<u8>,
    total: usize,
    sent: usize,
    got: usize,
    credit_fwd: u32,
}

impl Stream {
    pub fn new(from: (u64, u32), to: (u64, u32), seed: u8, total: usize) -> Stream {
        Stream {
            from,
            to,
            chunk: pattern(seed, 16_000),
            total,
            sent: 0,
            got: 0,
            credit_fwd: 0,
        }
    }

    pub fn done(&self) -> bool {
        self.got >= self.total
    }

    /// Sends what the receiver's credit allows.
    pub fn send(&mut self, tx: &mut Guest) {
        while self.sent < self.total
            && self.sent - self.credit_fwd as usize + self.chunk.len() <= 65_536
        {
            tx.send(Hdr::new(RW, self.from, self.to), &self.chunk);
            self.sent += self.chunk.len();
        }
    }

    /// Checks one payload that arrived, and returns credit when it is due.
    pub fn take(&mut self, rx: &mut Guest, tx: &mut Guest, payload: &[u8]) {
        let at = self.got % self.chunk.len();
        assert_eq!(
            payload[..],
            self.chunk[at..at + payload.len()],
            "stream content at {}",
            self.got
        );
        self.got += payload.len();
        if self.got - self.credit_fwd as usize >= 32_000 {
            let mut update = Hdr::new(CREDIT_UPDATE, self.to, self.from);
            update.fwd_cnt = self.got as u32;
            rx.send(update, &[]);
            // The sender may use the new credit once it has seen the
            // update, as a guest does: sending on an update still in
            // flight would be sending past the credit part-io knows of.
            let (h, _) = tx.recv();
            assert_eq!((h.op, h.fwd_cnt), (CREDIT_UPDATE, self.got as u32));
            self.credit_fwd = h.fwd_cnt;
        }
    }
}

/// Posts five malformed chains on `a`'s transmit ring (heads 0, 1, 3, 4,
/// 5; no kick): a descriptor outside guest memory, a descriptor loop, a
/// too-short header, a device-writable transmit buffer, and a header at
/// `liar_at` that claims more payload than its buffer holds.
pub fn post_malformed_chains(a: &mut Guest, liar_at: u64) {
    use super::{MEM_SIZE, NEXT, WRITE};
    a.dev.put_desc(1, 0, (MEM_SIZE as u64) + 0x1000, 64, 0, 0);
    a.dev.push_avail(1, 0);
    a.dev.put_desc(1, 1, TX_BUFS, 44, NEXT, 2);
    a.dev.put_desc(1, 2, TX_BUFS, 44, NEXT, 1);
    a.dev.push_avail(1, 1);
    a.dev.put_desc(1, 3, TX_BUFS, 20, 0, 0);
    a.dev.push_avail(1, 3);
    a.dev.put_desc(1, 4, TX_BUFS, 44, WRITE, 0);
    a.dev.push_avail(1, 4);
    let mut liar = Hdr::new(RW, A, B);
    liar.len = 5000;
    a.dev
        .mem
        .write_slice(&liar.encode(), GuestAddress(liar_at))
        .unwrap();
    a.dev.put_desc(1, 5, liar_at, 44 + 10, 0, 0);
    a.dev.push_avail(1, 5);
}
