//! The vhost-user message guard: checks every memory-region descriptor a
//! frontend sends before the vhost-user library can map it.
//!
//! `vhost-user-backend` 0.24 maps `SET_MEM_TABLE` and `ADD_MEM_REG` file
//! descriptors inside its request handler, `VhostUserHandler`, which is private
//! to the crate; the only backend callback, `VhostUserBackend::update_memory`,
//! runs after the regions are mapped and already published to the vrings. So
//! part-io does not hand the frontend's socket to `VhostUserDaemon` directly:
//! the daemon connects to a private socket (in a fresh 0700 directory) and the
//! guard relays messages between the two, frame by frame (12-byte header, body
//! of the size the header gives, file descriptors attached to the header).
//! Control messages only: kicks and interrupts go through eventfds and guest
//! memory is accessed in place, so the guard is not on the data path.
//!
//! One protocol repair happens here too: QEMU's virtio-net (7.2) sends
//! `SET_VRING_ENABLE` when the device is realized, before `SET_FEATURES`, and
//! `vhost-user-backend` 0.24 ends the connection over it ("inactive feature")
//! because `VHOST_USER_F_PROTOCOL_FEATURES` is not acked yet. The guard holds
//! such early requests back (acknowledging them if asked to) and replays the
//! last state of each ring right after `SET_FEATURES` acks the feature
//! (`EarlyEnables`).
//!
//! A memory region passes only if its file descriptor carries the seals
//! `F_SEAL_SHRINK` and `F_SEAL_GROW` (so the VMM can never shrink it under a
//! mapping and turn a guest access into SIGBUS in part-io) and the region lies
//! inside the file. A failing region is logged, counted, and ends the
//! connection before anything is mapped; other exports are not affected.

use partvisor_runtime::sync::MutexExt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, size (all u32 LE).
const HEADER_LEN: usize = 12;
/// Largest body a vhost-user message may have (`vhost`'s `MAX_MSG_SIZE`).
const MAX_BODY: usize = 0x1000;
/// Most file descriptors one message may carry (`vhost`'s limit).
const MAX_FDS: usize = 32;
/// Header flags value of protocol version 1.
const VERSION_1: u32 = 0x1;

/// Why the guard ended a connection.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("message body of {0} bytes exceeds the vhost-user limit of {MAX_BODY}")]
    TooLarge(usize),
    #[error("{0} memory regions but {1} file descriptors in {2}")]
    FdCount(usize, usize, &'static str),
    #[error("malformed {0} message body ({1} bytes)")]
    BadBody(&'static str, usize),
    #[error(
        "memory region {index} (guest {gpa:#x}, {size:#x} bytes) refused: \
         its fd is not sealed against {missing} (F_GET_SEALS = {seals:#x}); \
         the VMM must create guest memory with MFD_ALLOW_SEALING and add \
         F_SEAL_SHRINK|F_SEAL_GROW"
    )]
    Unsealed {
        index: usize,
        gpa: u64,
        size: u64,
        seals: i32,
        missing: &'static str,
    },
    #[error(
        "memory region {index} (guest {gpa:#x}, {size:#x} bytes): cannot read seals: {source}"
    )]
    Seals {
        index: usize,
        gpa: u64,
        size: u64,
        source: io::Error,
    },
    #[error(
        "memory region {index} (guest {gpa:#x}): offset {offset:#x} + size {size:#x} \
         exceeds the file size {file_size:#x}"
    )]
    OutsideFile {
        index: usize,
        gpa: u64,
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("{0} is refused: part-io does not offer dirty-page logging")]
    Refused(&'static str),
}

impl GuardError {
    /// True if the connection ended because of a memory region check.
    pub fn is_region_refusal(&self) -> bool {
        matches!(
            self,
            GuardError::Unsealed { .. } | GuardError::Seals { .. } | GuardError::OutsideFile { .. }
        )
    }
}

/// One framed message with its file descriptors.
struct Message {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    /// A message without file descriptors.
    fn new(req: u32, flags: u32, body: Vec<u8>) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&req.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            header,
            body,
            fds: Vec::new(),
        }
    }
}

/// `SET_VRING_ENABLE` requests that arrived before `SET_FEATURES`, held back
/// until the features are set (see the module documentation).
#[derive(Debug, Default)]
struct EarlyEnables {
    /// `SET_FEATURES` has been forwarded.
    features_set: bool,
    /// Last requested state per ring index, in arrival order.
    held: Vec<(u32, u32)>,
}

impl EarlyEnables {
    /// Looks at a frontend message about to be forwarded. Returns `Hold`
    /// (with the reply the frontend waits for, if any) for an early
    /// `SET_VRING_ENABLE`, and the messages to send after it for `SET_FEATURES`.
    fn filter(&mut self, msg: &Message) -> Early {
        let req = msg.request();
        if req == FrontendReq::SET_VRING_ENABLE as u32 && !self.features_set {
            let Ok(body) = <[u8; 8]>::try_from(msg.body.as_slice()) else {
                // Malformed: let the backend refuse it.
                return Early::Forward(Vec::new());
            };
            let index = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            let num = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
            self.held.retain(|&(i, _)| i != index);
            self.held.push((index, num));
            let reply = (msg.flags() & VhostUserHeaderFlag::NEED_REPLY.bits() != 0).then(|| {
                Message::new(
                    req,
                    VhostUserHeaderFlag::REPLY.bits() | VERSION_1,
                    0u64.to_le_bytes().to_vec(),
                )
            });
            return Early::Hold(reply);
        }
        if req == FrontendReq::SET_FEATURES as u32 && !self.features_set {
            self.features_set = true;
            let acked = <[u8; 8]>::try_from(msg.body.as_slice())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            let held = std::mem::take(&mut self.held);
            // Without PROTOCOL_FEATURES the backend enables every ring itself.
            if acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                return Early::Forward(Vec::new());
            }
            let replay = held
                .into_iter()
                .map(|(index, num)| {
                    let mut body = index.to_le_bytes().to_vec();
                    body.extend_from_slice(&num.to_le_bytes());
                    // No NEED_REPLY: nobody waits for an answer.
                    Message::new(FrontendReq::SET_VRING_ENABLE as u32, VERSION_1, body)
                })
                .collect();
            return Early::Forward(replay);
        }
        Early::Forward(Vec::new())
    }
}

/// What to do with one frontend message.
enum Early {
    /// Forward it, then send these.
    Forward(Vec<Message>),
    /// Do not forward it; answer the frontend with this, if anything.
    Hold(Option<Message>),
}

/// Reads one message; `Ok(None)` on a clean end of stream.
fn recv(sock: &UnixStream, body: Vec<u8>) -> Result<Option<Message>, GuardError> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    let (n, nfds) = loop {
        // SAFETY: the iovec points at `header`, valid for HEADER_LEN bytes for
        // the duration of the call; received fds are written into `raw_fds`.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) } {
            Ok(r) => break r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: the kernel installed these descriptors in our table for us
        // (SCM_RIGHTS); nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    if n < HEADER_LEN {
        reader.read_exact(&mut header[n..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_BODY {
        return Err(GuardError::TooLarge(size));
    }
    let mut body = body;
    body.clear();
    body.resize(size, 0);
    reader.read_exact(&mut body)?;
    Ok(Some(Message { header, body, fds }))
}

fn send(sock: &UnixStream, msg: &Message) -> Result<(), GuardError> {
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let bufs: [&[u8]; 2] = [&msg.header, &msg.body];
    let total = HEADER_LEN + msg.body.len();
    let n = loop {
        match sock.send_with_fds(&bufs, &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    if n < total {
        // The fds went with the first byte; the rest is plain data.
        let mut w = sock;
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&msg.header);
        all.extend_from_slice(&msg.body);
        w.write_all(&all[n..])?;
    }
    Ok(())
}

/// Checks one region/fd pair: sealed against shrink and grow, and inside the file.
pub fn check_region(
    index: usize,
    region: &VhostUserMemoryRegion,
    fd: &OwnedFd,
) -> Result<(), GuardError> {
    let (gpa, size) = (region.guest_phys_addr, region.memory_size);
    // SAFETY: F_GET_SEALS only reads flags of a descriptor we own.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(GuardError::Seals {
            index,
            gpa,
            size,
            source: io::Error::last_os_error(),
        });
    }
    let missing = match (
        seals & libc::F_SEAL_SHRINK != 0,
        seals & libc::F_SEAL_GROW != 0,
    ) {
        (true, true) => None,
        (false, true) => Some("shrinking (F_SEAL_SHRINK)"),
        (true, false) => Some("growing (F_SEAL_GROW)"),
        (false, false) => Some("shrinking or growing (F_SEAL_SHRINK|F_SEAL_GROW)"),
    };
    if let Some(missing) = missing {
        return Err(GuardError::Unsealed {
            index,
            gpa,
            size,
            seals,
            missing,
        });
    }
    let file = File::from(fd.try_clone()?);
    let file_size = file.metadata()?.len();
    let offset = region.mmap_offset;
    if size == 0 || offset.checked_add(size).is_none_or(|end| end > file_size) {
        return Err(GuardError::OutsideFile {
            index,
            gpa,
            offset,
            size,
            file_size,
        });
    }
    Ok(())
}

/// Copies a plain-data message struct out of `bytes` (exactly its size; the
/// body buffer need not be aligned for it).
fn read_pod<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(bytes);
    v
}

/// Checks a frontend-to-backend message; `Ok` means it may be forwarded.
fn check(msg: &Message) -> Result<(), GuardError> {
    let req = msg.request();
    if req == FrontendReq::SET_MEM_TABLE as u32 {
        let hdr_len = size_of::<VhostUserMemory>();
        let reg_len = size_of::<VhostUserMemoryRegion>();
        let bad = || GuardError::BadBody("SET_MEM_TABLE", msg.body.len());
        let hdr: VhostUserMemory = read_pod(msg.body.get(..hdr_len).ok_or_else(bad)?);
        let n = hdr.num_regions as usize;
        if msg.body.len() != hdr_len + n * reg_len {
            return Err(bad());
        }
        if n != msg.fds.len() {
            return Err(GuardError::FdCount(n, msg.fds.len(), "SET_MEM_TABLE"));
        }
        for (i, fd) in msg.fds.iter().enumerate() {
            let start = hdr_len + i * reg_len;
            let region: VhostUserMemoryRegion = read_pod(&msg.body[start..start + reg_len]);
            check_region(i, &region, fd)?;
        }
    } else if req == FrontendReq::ADD_MEM_REG as u32 {
        let bad = || GuardError::BadBody("ADD_MEM_REG", msg.body.len());
        if msg.body.len() != size_of::<VhostUserSingleMemoryRegion>() {
            return Err(bad());
        }
        let single: VhostUserSingleMemoryRegion = read_pod(&msg.body);
        if msg.fds.len() != 1 {
            return Err(GuardError::FdCount(1, msg.fds.len(), "ADD_MEM_REG"));
        }
        check_region(0, &single, &msg.fds[0])?;
    } else if req == FrontendReq::SET_LOG_BASE as u32 {
        return Err(GuardError::Refused("SET_LOG_BASE"));
    } else if req == FrontendReq::SET_LOG_FD as u32 {
        return Err(GuardError::Refused("SET_LOG_FD"));
    }
    Ok(())
}

/// Relays messages between `frontend` and the daemon's end `backend` until
/// either side closes or a message fails a check; then shuts both down.
pub fn relay(frontend: UnixStream, backend: UnixStream) -> Result<(), GuardError> {
    let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
    // Both threads may write to the frontend: one message at a time.
    let to_frontend = Arc::new(Mutex::new(()));
    let to_frontend2 = to_frontend.clone();
    // Replies (and any backend-initiated message) go back unchanged.
    let replies = std::thread::Builder::new()
        .name("part-io-guard-reply".into())
        .spawn(move || {
            let mut buf = Vec::new();
            while let Ok(Some(msg)) = recv(&b2, std::mem::take(&mut buf)) {
                let sent = {
                    let _one = to_frontend2.locked();
                    send(&f2, &msg)
                };
                if sent.is_err() {
                    break;
                }
                buf = msg.body;
            }
            let _ = f2.shutdown(Shutdown::Both);
            let _ = b2.shutdown(Shutdown::Both);
        })?;
    let result = (|| {
        let mut buf = Vec::new();
        let mut early = EarlyEnables::default();
        while let Some(msg) = recv(&frontend, std::mem::take(&mut buf))? {
            check(&msg)?;
            match early.filter(&msg) {
                Early::Hold(reply) => {
                    if let Some(reply) = reply {
                        let _one = to_frontend.locked();
                        send(&frontend, &reply)?;
                    }
                }
                Early::Forward(then) => {
                    send(&backend, &msg)?;
                    for m in &then {
                        send(&backend, m)?;
                    }
                }
            }
            buf = msg.body;
        }
        Ok(())
    })();
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    let _ = replies.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(size: u64, seals: i32) -> OwnedFd {
        // SAFETY: memfd_create with a valid C string; the fd is owned below.
        let fd = unsafe {
            libc::memfd_create(
                c"guard-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().unwrap()).set_len(size).unwrap();
        // SAFETY: plain fcntl on our fd.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0);
        fd
    }

    fn region(size: u64, offset: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(0x10_0000, size, 0x7f00_0000_0000, offset)
    }

    const BOTH: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

    #[test]
    fn sealed_region_inside_the_file_passes() {
        let fd = memfd(0x20_0000, BOTH);
        check_region(0, &region(0x10_0000, 0x10_0000), &fd).unwrap();
        check_region(0, &region(0x20_0000, 0), &fd).unwrap();
    }

    #[test]
    fn missing_seals_are_refused_by_name() {
        for (seals, missing) in [
            (0, "shrinking or growing"),
            (libc::F_SEAL_GROW, "shrinking (F_SEAL_SHRINK)"),
            (libc::F_SEAL_SHRINK, "growing (F_SEAL_GROW)"),
        ] {
            let fd = memfd(0x1000, seals);
            let e = check_region(3, &region(0x1000, 0), &fd).unwrap_err();
            assert!(e.is_region_refusal());
            let msg = e.to_string();
            assert!(msg.contains("region 3") && msg.contains(missing), "{msg}");
        }
    }

    #[test]
    fn region_reaching_past_the_end_of_the_file_is_refused() {
        let fd = memfd(0x2000, BOTH);
        for (size, offset) in [(0x3000, 0), (0x1000, 0x1001), (0x1000, u64::MAX), (0, 0)] {
            let e = check_region(0, &region(size, offset), &fd).unwrap_err();
            assert!(matches!(e, GuardError::OutsideFile { .. }), "{e}");
        }
    }

    fn message(req: FrontendReq, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&(req as u32).to_le_bytes());
        header[4..8].copy_from_slice(&1u32.to_le_bytes());
        header[8..].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message { header, body, fds }
    }

    fn mem_table(regions: &[VhostUserMemoryRegion]) -> Vec<u8> {
        let mut body = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        for r in regions {
            body.extend_from_slice(r.as_slice());
        }
        body
    }

    #[test]
    fn mem_table_messages_are_checked_region_by_region() {
        let good = memfd(0x2000, BOTH);
        let bad = memfd(0x2000, 0);
        let r = region(0x2000, 0);
        let dup = |f: &OwnedFd| f.try_clone().unwrap();
        let ok = message(
            FrontendReq::SET_MEM_TABLE,
            mem_table(&[r, r]),
            vec![dup(&good), dup(&good)],
        );
        check(&ok).unwrap();
        // The second region's fd is unsealed.
        let m = message(
            FrontendReq::SET_MEM_TABLE,
            mem_table(&[r, r]),
            vec![dup(&good), dup(&bad)],
        );
        assert!(matches!(
            check(&m),
            Err(GuardError::Unsealed { index: 1, .. })
        ));
        // Fewer fds than regions.
        let m = message(
            FrontendReq::SET_MEM_TABLE,
            mem_table(&[r, r]),
            vec![dup(&good)],
        );
        assert!(matches!(check(&m), Err(GuardError::FdCount(2, 1, _))));
        // Body length disagreeing with num_regions.
        let mut body = mem_table(&[r]);
        body.truncate(20);
        let m = message(FrontendReq::SET_MEM_TABLE, body, vec![dup(&good)]);
        assert!(matches!(check(&m), Err(GuardError::BadBody(..))));
        // ADD_MEM_REG goes through the same check.
        let single = VhostUserSingleMemoryRegion::new(0x10_0000, 0x2000, 0x7f00_0000_0000, 0);
        let m = message(
            FrontendReq::ADD_MEM_REG,
            single.as_slice().to_vec(),
            vec![dup(&bad)],
        );
        assert!(matches!(
            check(&m),
            Err(GuardError::Unsealed { index: 0, .. })
        ));
        let m = message(
            FrontendReq::ADD_MEM_REG,
            single.as_slice().to_vec(),
            vec![dup(&good)],
        );
        check(&m).unwrap();
        // Dirty logging is never offered, so its fds are never taken.
        let m = message(FrontendReq::SET_LOG_BASE, vec![0; 16], vec![dup(&good)]);
        assert!(matches!(
            check(&m),
            Err(GuardError::Refused("SET_LOG_BASE"))
        ));
        // Other requests pass untouched.
        check(&message(FrontendReq::GET_FEATURES, vec![], vec![])).unwrap();
    }

    #[test]
    fn vring_enables_before_set_features_are_held_and_replayed() {
        let enable = |index: u32, num: u32, flags: u32| {
            let mut body = index.to_le_bytes().to_vec();
            body.extend_from_slice(&num.to_le_bytes());
            let mut m = message(FrontendReq::SET_VRING_ENABLE, body, vec![]);
            m.header[4..8].copy_from_slice(&flags.to_le_bytes());
            m
        };
        let mut e = EarlyEnables::default();
        // Held; answered only when the frontend asks for a reply.
        assert!(matches!(e.filter(&enable(0, 1, 1)), Early::Hold(None)));
        match e.filter(&enable(1, 0, 1 | 0x8)) {
            Early::Hold(Some(r)) => {
                assert_eq!(r.request(), FrontendReq::SET_VRING_ENABLE as u32);
                assert_eq!(r.flags(), 0x5, "VERSION | REPLY");
                assert_eq!(r.body, 0u64.to_le_bytes());
            }
            _ => panic!("expected a held request with a reply"),
        }
        assert!(matches!(e.filter(&enable(1, 1, 1)), Early::Hold(None)));
        // SET_FEATURES with PROTOCOL_FEATURES: forwarded, then the last state
        // of each ring is replayed, without NEED_REPLY.
        let features = (1u64 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let set = message(
            FrontendReq::SET_FEATURES,
            features.to_le_bytes().to_vec(),
            vec![],
        );
        let Early::Forward(replay) = e.filter(&set) else {
            panic!("SET_FEATURES must be forwarded");
        };
        let states: Vec<(Vec<u8>, u32)> =
            replay.iter().map(|m| (m.body.clone(), m.flags())).collect();
        assert_eq!(
            states,
            vec![
                ([0u32.to_le_bytes(), 1u32.to_le_bytes()].concat(), 1),
                ([1u32.to_le_bytes(), 1u32.to_le_bytes()].concat(), 1),
            ]
        );
        // Afterwards everything passes through.
        assert!(matches!(e.filter(&enable(0, 0, 1)), Early::Forward(v) if v.is_empty()));
        // Without PROTOCOL_FEATURES nothing is replayed.
        let mut e = EarlyEnables::default();
        assert!(matches!(e.filter(&enable(0, 1, 1)), Early::Hold(None)));
        let set = message(
            FrontendReq::SET_FEATURES,
            (1u64 << 32).to_le_bytes().to_vec(),
            vec![],
        );
        assert!(matches!(e.filter(&set), Early::Forward(v) if v.is_empty()));
    }

    #[test]
    fn a_plain_file_without_seal_support_is_refused() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(0x1000).unwrap();
        let e = check_region(0, &region(0x1000, 0), &OwnedFd::from(f)).unwrap_err();
        assert!(e.is_region_refusal(), "{e}");
    }
}
