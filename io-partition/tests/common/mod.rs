//! Test-side vhost-user frontend and part-io process harness.
//!
//! The "guest" is a memfd mapped in the test; the test lays out a split
//! virtqueue in it, posts virtio-blk requests, kicks through the kick eventfd
//! and waits on the call eventfd, exactly as a VMM's device would.

#![allow(dead_code)]

pub mod net;
pub mod vsock;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const QSIZE: u16 = 16;
pub const MEM_SIZE: usize = 4 << 20;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const INDIRECT: u64 = 0x3000;
pub const HDR: u64 = 0x4000;
pub const STATUS: u64 = 0x5000;
pub const DATA: u64 = 0x10000;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A running part-io process, killed on drop.
pub struct PartIo {
    child: Child,
    log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl PartIo {
    /// Starts `part-io blk` with one `--export` per spec (paths relative to
    /// the harness' temp dir are the caller's business) and waits until every
    /// socket is listening.
    pub fn spawn(dir: tempfile::TempDir, exports: &[String]) -> PartIo {
        let mut args = vec!["blk".to_string()];
        for e in exports {
            args.push("--export".into());
            args.push(e.clone());
        }
        PartIo::spawn_args(dir, &args, exports.len())
    }

    /// Starts `part-io ARGS...` and waits until `ready` " serving " lines
    /// (one per export or port) are logged.
    pub fn spawn_args(dir: tempfile::TempDir, args: &[String], ready: usize) -> PartIo {
        let log = dir.path().join("part-io.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_part-io"));
        cmd.args(args);
        let child = cmd
            .env("PARTVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = PartIo { child, log, dir };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if p.log().matches(" serving ").count() == ready {
                return p;
            }
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("part-io exited early ({status}): {}", p.log());
            }
            assert!(
                Instant::now() < deadline,
                "part-io did not start: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never showed {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Process id of part-io.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of open file descriptors of the part-io process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for PartIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir with `n` zero-filled images of `size` bytes: `img0.raw`, ...
pub fn setup(n: usize, size: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..n {
        let f = File::create(dir.path().join(format!("img{i}.raw"))).unwrap();
        f.set_len(size).unwrap();
    }
    dir
}

pub fn export(dir: &Path, i: usize, extra: &str) -> String {
    format!(
        "socket={},image={}{extra}",
        dir.join(format!("s{i}.sock")).display(),
        dir.join(format!("img{i}.raw")).display()
    )
}

pub fn sock(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("s{i}.sock"))
}

/// Guest memory: a memfd with the given seals, mapped at guest address 0.
pub fn guest_memory(seals: i32) -> GuestMemoryMmap<()> {
    let fd = channels::memfd::unsealed("part-io-test-guest", MEM_SIZE as u64).unwrap();
    if seals != 0 {
        channels::memfd::add_seals(fd.as_fd(), seals).unwrap();
    }
    let file = File::from(fd);
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// Guest memory in two regions of one sealed memfd, mapped separately and
/// adjacent in guest physical space (split at `MEM_SIZE / 2`).
pub fn guest_memory_two_regions() -> GuestMemoryMmap<()> {
    let one = guest_memory(SEALED);
    let file = one
        .find_region(GuestAddress(0))
        .unwrap()
        .file_offset()
        .unwrap()
        .file()
        .try_clone()
        .unwrap();
    let half = MEM_SIZE / 2;
    GuestMemoryMmap::from_ranges_with_files([
        (
            GuestAddress(0),
            half,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        ),
        (
            GuestAddress(half as u64),
            half,
            Some(FileOffset::new(file, half as u64)),
        ),
    ])
    .unwrap()
}

pub const SEALED: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A virtio-blk device as seen from the frontend.
pub struct Device {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub kick: EventFd,
    pub call: EventFd,
    pub features: u64,
    next_avail: u16,
    used_seen: u16,
    pub event_idx: bool,
}

pub const WANTED: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << 30); // VHOST_USER_F_PROTOCOL_FEATURES

fn host(mem: &GuestMemoryMmap<()>, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
}

/// The vhost-user handshake every test device starts with: connects to
/// `socket` (a hung part-io fails the test instead of hanging it), takes
/// ownership, acks `offered & wanted` (plus `EVENT_IDX` when `event_idx`),
/// the CONFIG and REPLY_ACK protocol features, and shares `mem`. Returns the
/// frontend and the acked features.
pub fn negotiate(
    socket: &Path,
    mem: &GuestMemoryMmap<()>,
    queues: u64,
    wanted: u64,
    event_idx: bool,
) -> Result<(Frontend, u64), vhost::Error> {
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(vhost::Error::IOError)?;
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut fe = Frontend::from_stream(stream, queues);
    fe.set_owner()?;
    let offered = fe.get_features()?;
    let mut want = wanted;
    if event_idx {
        want |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let features = offered & want;
    fe.set_features(features)?;
    let pf = fe.get_protocol_features()?;
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK),
    )?;
    // Ask for an ack of every request, so a refused SET_MEM_TABLE fails here.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let regions = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()?;
    fe.set_mem_table(&regions)?;
    Ok((fe, features))
}

/// Sets up and enables queue `q` with `qsize` entries and its rings at the
/// guest addresses `(desc, avail, used)`, as a VMM would. Returns the queue's
/// (call, kick) eventfds.
pub fn setup_queue(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap<()>,
    q: usize,
    qsize: u16,
    (desc, avail, used): (u64, u64, u64),
) -> Result<(EventFd, EventFd), vhost::Error> {
    fe.set_vring_num(q, qsize)?;
    fe.set_vring_addr(
        q,
        &VringConfigData {
            queue_max_size: qsize,
            queue_size: qsize,
            flags: 0,
            desc_table_addr: host(mem, desc),
            used_ring_addr: host(mem, used),
            avail_ring_addr: host(mem, avail),
            log_addr: None,
        },
    )?;
    fe.set_vring_base(q, 0)?;
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(q, &call)?;
    fe.set_vring_kick(q, &kick)?;
    fe.set_vring_enable(q, true)?;
    Ok((call, kick))
}

impl Device {
    /// Connects and sets up queue 0, as a VMM would.
    pub fn connect(
        socket: &Path,
        mem: GuestMemoryMmap<()>,
        event_idx: bool,
    ) -> Result<Device, vhost::Error> {
        let (mut fe, features) = negotiate(socket, &mem, 1, WANTED, event_idx)?;
        let (call, kick) = setup_queue(&mut fe, &mem, 0, QSIZE, (DESC, AVAIL, USED))?;
        Ok(Device {
            fe,
            mem,
            kick,
            call,
            features,
            next_avail: 0,
            used_seen: 0,
            event_idx,
        })
    }

    pub fn config(&mut self, offset: u32, len: u32) -> Vec<u8> {
        let (_, payload) = self
            .fe
            .get_config(
                offset,
                len,
                VhostUserConfigFlags::empty(),
                &vec![0; len as usize],
            )
            .unwrap();
        payload
    }

    pub fn desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.put_desc(GuestAddress(DESC), idx, addr, len, flags, next);
    }

    pub fn put_desc(
        &self,
        table: GuestAddress,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        self.mem
            .write_obj(
                Descriptor::new(addr, len, flags, next),
                GuestAddress(table.0 + u64::from(idx) * 16),
            )
            .unwrap();
    }

    /// Sets `used_event` (EVENT_IDX): interrupt once used idx passes `v`.
    pub fn set_used_event(&self, v: u16) {
        self.mem
            .write_obj(v, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
            .unwrap();
    }

    /// Puts `head` on the available ring without kicking.
    pub fn push_avail(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Posts `head` and kicks.
    pub fn post(&mut self, head: u16) {
        if self.event_idx {
            self.set_used_event(self.used_seen);
        }
        self.push_avail(head);
        self.kick();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// True if the call eventfd was signalled (and clears it).
    pub fn take_call(&self) -> bool {
        self.call.read().is_ok()
    }

    /// Waits for an interrupt on the call eventfd, then returns the next used
    /// element `(id, len)`.
    pub fn wait_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 50) };
            if self.take_call() && self.used_idx() != self.used_seen {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no interrupt for used entry {} (used idx {})",
                self.used_seen,
                self.used_idx()
            );
        }
        self.next_used()
    }

    /// Returns the next used element without waiting for an interrupt.
    pub fn next_used(&mut self) -> (u32, u32) {
        assert_ne!(self.used_idx(), self.used_seen, "no new used entry");
        let slot = u64::from(self.used_seen % QSIZE);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot + 4))
            .unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        (id, len)
    }

    pub fn write_header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Issues a request with `data_len` bytes of data at DATA (device-writable
    /// for IN and GET_ID); returns (status, used len).
    pub fn request(&mut self, req_type: u32, sector: u64, data_len: u32) -> (u8, u32) {
        self.write_header(req_type, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let data_flags = if req_type == VIRTIO_BLK_T_OUT {
            0
        } else {
            WRITE
        };
        if data_len == 0 {
            self.desc(0, HDR, 16, NEXT, 2);
        } else {
            self.desc(0, HDR, 16, NEXT, 1);
            self.desc(1, DATA, data_len, data_flags | NEXT, 2);
        }
        self.desc(2, STATUS, 1, WRITE, 0);
        self.post(0);
        let (id, len) = self.wait_used();
        assert_eq!(id, 0);
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        self.request(VIRTIO_BLK_T_OUT, sector, data.len() as u32).0
    }

    pub fn read_sectors(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0xee; len], GuestAddress(DATA))
            .unwrap();
        let (status, used_len) = self.request(VIRTIO_BLK_T_IN, sector, len as u32);
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        if status == VIRTIO_BLK_S_OK as u8 {
            assert_eq!(used_len, len as u32 + 1, "used length of a read");
        }
        (status, buf)
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}
