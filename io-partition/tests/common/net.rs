//! Test-side vhost-user-net frontend: a "guest" with a receive queue (0) and
//! a transmit queue (1) laid out in a sealed memfd, as a VMM's virtio-net
//! device and a guest driver would set them up.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{negotiate, setup_queue, PartIo, TIMEOUT, WRITE};

pub const NET_QSIZE: u16 = 256;
pub const HDR: usize = 12;
/// Receive buffer size: header + largest frame.
pub const RX_BUF: u32 = 12 + 1514;
const BUF_STRIDE: u64 = 2048;
/// Ring layout per queue: (desc, avail, used, buffers).
const RINGS: [(u64, u64, u64, u64); 2] = [
    (0x0000, 0x1000, 0x2000, 0x10_0000),
    (0x4000, 0x5000, 0x6000, 0x20_0000),
];

pub const NET_WANTED: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << 30); // VHOST_USER_F_PROTOCOL_FEATURES

pub fn mac(last: u8) -> [u8; 6] {
    [0x02, 0x00, 0x00, 0x00, 0x00, last]
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Local experimental ethertype used by the tests.
pub const ETHERTYPE: u16 = 0x88b5;

/// An Ethernet frame `dst, src, ETHERTYPE, payload`.
pub fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A frame carrying sequence number `seq` and `len` bytes of payload derived from it.
pub fn seq_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    p.extend((4..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seq) as u8));
    frame(dst, src, &p)
}

/// Starts `part-io net` with one port per `(socket name, mac)` in a fresh temp
/// dir, plus `extra` arguments, and a stats socket `stats.sock`.
pub fn spawn_switch(ports: &[[u8; 6]], extra: &[&str]) -> PartIo {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["net".to_string()];
    for (i, m) in ports.iter().enumerate() {
        args.push("--port".into());
        args.push(format!(
            "socket={},mac={}",
            dir.path().join(format!("p{i}.sock")).display(),
            mac_str(*m)
        ));
    }
    args.push("--stats-socket".into());
    args.push(dir.path().join("stats.sock").display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    PartIo::spawn_args(dir, &args, ports.len())
}

pub fn port_sock(p: &PartIo, i: usize) -> PathBuf {
    p.dir.path().join(format!("p{i}.sock"))
}

/// The switch's counters (one JSON line from the stats socket).
pub fn stats(p: &PartIo) -> serde_json::Value {
    let s = UnixStream::connect(p.dir.path().join("stats.sock")).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Counter `name` of port `i`.
pub fn port_stat(p: &PartIo, i: usize, name: &str) -> u64 {
    stats(p)["ports"][i][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// The (desc, avail, used) addresses of one entry of [`RINGS`].
fn ring_addrs(&(desc, avail, used, _): &(u64, u64, u64, u64)) -> (u64, u64, u64) {
    (desc, avail, used)
}

/// One split virtqueue as the driver sees it.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    next_avail: u16,
    used_seen: u16,
}

/// A virtio-net device as seen from the driver side.
pub struct NetDevice {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub features: u64,
    kick: [EventFd; 2],
    call: [EventFd; 2],
    rings: [Ring; 2],
    qsize: u16,
    tx_free: Vec<u16>,
    /// Receive buffers go back on the ring as soon as they are consumed.
    pub auto_repost: bool,
    /// Interrupts seen on the receive queue.
    pub rx_interrupts: u64,
}

impl NetDevice {
    /// Connects to `socket`, negotiates, sets up both queues with `qsize`
    /// entries and posts no receive buffers yet.
    pub fn connect(
        socket: &Path,
        mem: GuestMemoryMmap<()>,
        qsize: u16,
        event_idx: bool,
    ) -> Result<NetDevice, vhost::Error> {
        assert!(qsize <= NET_QSIZE);
        let (mut fe, features) = negotiate(socket, &mem, 2, NET_WANTED, event_idx)?;
        let (call0, kick0) = setup_queue(&mut fe, &mem, 0, qsize, ring_addrs(&RINGS[0]))?;
        let (call1, kick1) = setup_queue(&mut fe, &mem, 1, qsize, ring_addrs(&RINGS[1]))?;
        let (call, kick) = ([call0, call1], [kick0, kick1]);
        let ring = |&(desc, avail, used, bufs): &(u64, u64, u64, u64)| Ring {
            desc,
            avail,
            used,
            bufs,
            next_avail: 0,
            used_seen: 0,
        };
        Ok(NetDevice {
            fe,
            mem,
            features,
            kick,
            call,
            rings: [ring(&RINGS[0]), ring(&RINGS[1])],
            qsize,
            tx_free: (0..qsize).rev().collect(),
            auto_repost: true,
            rx_interrupts: 0,
        })
    }

    pub fn config(&mut self) -> Vec<u8> {
        let (_, payload) = self
            .fe
            .get_config(0, 12, VhostUserConfigFlags::empty(), &[0; 12])
            .unwrap();
        payload
    }

    fn buf(&self, q: usize, id: u16) -> u64 {
        self.rings[q].bufs + u64::from(id) * BUF_STRIDE
    }

    pub fn put_desc(&self, q: usize, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mem
            .write_obj(
                Descriptor::new(addr, len, flags, next),
                GuestAddress(self.rings[q].desc + u64::from(id) * 16),
            )
            .unwrap();
    }

    pub fn push_avail(&mut self, q: usize, head: u16) {
        let qsize = self.qsize;
        let r = &mut self.rings[q];
        let slot = u64::from(r.next_avail % qsize);
        self.mem
            .write_obj(head, GuestAddress(r.avail + 4 + 2 * slot))
            .unwrap();
        r.next_avail = r.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(r.next_avail, GuestAddress(r.avail + 2))
            .unwrap();
    }

    pub fn kick(&self, q: usize) {
        self.kick[q].write(1).unwrap();
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// Next used element `(id, len)` of queue `q`, if any.
    pub fn pop_used(&mut self, q: usize) -> Option<(u16, u32)> {
        if self.used_idx(q) == self.rings[q].used_seen {
            return None;
        }
        let r = &mut self.rings[q];
        let slot = u64::from(r.used_seen % self.qsize);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(r.used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(r.used + 4 + 8 * slot + 4))
            .unwrap();
        r.used_seen = r.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Posts receive buffer `id` (one device-writable descriptor of RX_BUF bytes).
    pub fn post_rx(&mut self, id: u16) {
        self.post_rx_len(id, RX_BUF);
    }

    pub fn post_rx_len(&mut self, id: u16, len: u32) {
        let addr = self.buf(0, id);
        self.put_desc(0, id, addr, len, WRITE, 0);
        self.push_avail(0, id);
    }

    /// Posts `n` receive buffers (ids 0..n) and kicks.
    pub fn fill_rx(&mut self, n: u16) {
        for id in 0..n {
            self.post_rx(id);
        }
        self.kick(0);
    }

    /// Completed transmit buffers go back to the free list.
    pub fn reap_tx(&mut self) {
        while let Some((id, len)) = self.pop_used(1) {
            assert_eq!(len, 0, "transmit used length");
            self.tx_free.push(id);
        }
    }

    /// Transmit buffers still owned by the device.
    pub fn tx_in_flight(&self) -> usize {
        usize::from(self.qsize) - self.tx_free.len()
    }

    /// Queues `frame` (with a zero header) on the transmit ring without
    /// kicking; false if no descriptor is free.
    pub fn queue_tx(&mut self, frame: &[u8]) -> bool {
        self.queue_tx_raw(&[0u8; HDR], frame)
    }

    pub fn queue_tx_raw(&mut self, hdr: &[u8; HDR], frame: &[u8]) -> bool {
        self.reap_tx();
        let Some(id) = self.tx_free.pop() else {
            return false;
        };
        let addr = self.buf(1, id);
        self.mem.write_slice(hdr, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(addr + HDR as u64))
            .unwrap();
        self.put_desc(1, id, addr, (HDR + frame.len()) as u32, 0, 0);
        self.push_avail(1, id);
        true
    }

    /// Queues and kicks.
    pub fn send(&mut self, frame: &[u8]) {
        assert!(self.queue_tx(frame), "no free transmit descriptor");
        self.kick(1);
    }

    /// Waits until every transmit buffer is back.
    pub fn wait_tx_done(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.reap_tx();
            if self.tx_in_flight() == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "transmit buffers never completed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The next received frame (header stripped), if one is there; checks
    /// the header and reposts the buffer when `auto_repost`.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        if self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0 {
            // used_event: interrupt me for the next used entry.
            let r = &self.rings[0];
            self.mem
                .write_obj(
                    r.used_seen,
                    GuestAddress(r.avail + 4 + 2 * u64::from(self.qsize)),
                )
                .unwrap();
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
        if self.call[0].read().is_ok() {
            self.rx_interrupts += 1;
        }
        let (id, len) = self.pop_used(0)?;
        assert!(len as usize >= HDR + 14, "receive used length {len}");
        let mut buf = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(self.buf(0, id)))
            .unwrap();
        let mut want_hdr = [0u8; HDR];
        want_hdr[10] = 1; // num_buffers
        assert_eq!(buf[..HDR], want_hdr, "virtio_net_hdr_v1 on receive");
        if self.auto_repost {
            self.post_rx(id);
            self.kick(0);
        }
        Some(buf.split_off(HDR))
    }

    /// Waits up to `timeout` for a frame.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.try_recv() {
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.call[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(20) as i32) };
        }
    }

    pub fn recv(&mut self) -> Vec<u8> {
        self.recv_timeout(TIMEOUT).expect("no frame received")
    }
}

/// Connects a device with `qsize`-entry queues to port `i` and posts
/// `rx_bufs` receive buffers.
pub fn attach(p: &PartIo, i: usize, rx_bufs: u16) -> NetDevice {
    let mut d = NetDevice::connect(
        &port_sock(p, i),
        super::guest_memory(super::SEALED),
        NET_QSIZE,
        false,
    )
    .unwrap();
    d.fill_rx(rx_bufs);
    wait_rx_ready(p, i);
    d
}

/// Waits until the switch can deliver to port `i` (see `Port::rx_ready`).
pub fn wait_rx_ready(p: &PartIo, i: usize) {
    wait_until("the port's receive queue to be ready", || {
        stats(p)["ports"][i]["rx_ready"] == true
    });
}

/// Lets in-flight frames settle: waits until `cond` holds.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
