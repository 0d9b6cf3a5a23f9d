//! The vhost-user backend every part-io device shares: one
//! [`VhostUserBackendMut`] implementation ([`Backend`]) around a device model
//! ([`DeviceModel`]: `blk::BlkDevice`, `net::NetDevice`) that supplies only
//! what differs between devices (queues, feature bits, config space, what a
//! kick does).
//!
//! Shared: `VERSION_1`, `RING_F_EVENT_IDX` and `VHOST_USER_F_PROTOCOL_FEATURES`
//! in the offered features, the `CONFIG` protocol feature, config reads of
//! exactly the requested length, the event-index flag, the worker exit eventfds
//! ([`ExitFds`]), the kick check and the drain loop that keeps notifications
//! off while a queue is processed.

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use partvisor_runtime::sync::MutexExt;
use tracing::{error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::server::Mem;

/// Features every part-io device offers.
pub const COMMON_FEATURES: u64 = (1u64 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The field a device's log lines name it by (`export=` for blk, `port=`
/// for net).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKey {
    /// A blk export.
    Export,
    /// A switch port.
    Port,
}

impl LogKey {
    /// Logs `msg` at warn level, tagged with `name`.
    pub fn warn(self, name: &dyn fmt::Display, msg: fmt::Arguments<'_>) {
        match self {
            LogKey::Export => warn!(export = %name, "{msg}"),
            LogKey::Port => warn!(port = %name, "{msg}"),
        }
    }

    /// Logs `msg` at error level, tagged with `name`.
    pub fn error(self, name: &dyn fmt::Display, msg: fmt::Arguments<'_>) {
        match self {
            LogKey::Export => error!(export = %name, "{msg}"),
            LogKey::Port => error!(port = %name, "{msg}"),
        }
    }
}

/// What one device model adds to [`Backend`].
pub trait DeviceModel: Send + Sync + 'static {
    /// The field its log lines carry.
    const LOG_KEY: LogKey;
    /// Number of virtqueues.
    const NUM_QUEUES: usize;
    /// Largest queue a frontend may configure (`SET_VRING_NUM`).
    const MAX_QUEUE_SIZE: u16;
    /// The seccomp role its queue worker enters before it handles its first
    /// kick (`None`: the worker keeps the process's [`partvisor_seccomp::Role::Io`]).
    const QUEUE_ROLE: Option<partvisor_seccomp::Role>;

    /// Name used in log lines: the socket path.
    fn name(&self) -> std::path::Display<'_>;
    /// Device-specific feature bits, offered on top of [`COMMON_FEATURES`].
    fn features(&self) -> u64;
    /// The config space; bytes beyond it read as zero.
    fn config(&self) -> &[u8];
    /// The frontend acked `features` (`SET_FEATURES`).
    fn acked_features(&mut self, _features: u64) {}
    /// The daemon published a new memory table in `mem`.
    fn update_memory(&mut self, _mem: Mem) {}
    /// Any queue was kicked; runs before the kick is handled.
    fn kicked(&mut self, _vrings: &[VringRwLock]) {}
    /// Whether a kick on `queue` asks for it to be drained (false: the kick
    /// only tells the device that buffers were posted).
    fn drains(&self, _queue: usize) -> bool {
        true
    }
    /// Processes what the driver posted on `queue` (one pass).
    fn process_queue(&mut self, queue: usize, vring: &VringRwLock) -> io::Result<()>;
}

/// The vhost-user backend of one connection: a device model and the state
/// every device keeps the same way.
pub struct Backend<M> {
    model: M,
    event_idx: bool,
    exit_fds: ExitFds,
}

impl<M: DeviceModel> Backend<M> {
    /// A backend serving `model`.
    pub fn new(model: M) -> Self {
        Backend {
            model,
            event_idx: false,
            exit_fds: ExitFds::default(),
        }
    }

    /// The device model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The worker exit eventfds handed out so far.
    pub fn exit_fds_mut(&mut self) -> &mut ExitFds {
        &mut self.exit_fds
    }

    fn warn(&self, msg: fmt::Arguments<'_>) {
        M::LOG_KEY.warn(&self.model.name(), msg);
    }

    /// Runs the model on `queue` until it is drained. Without EVENT_IDX that
    /// is one pass; with it, notifications stay off while draining and the
    /// queue is drained again if the driver posted more before they were
    /// back on.
    fn drain(&mut self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        if !self.event_idx {
            return self.model.process_queue(queue, vring);
        }
        loop {
            if let Err(e) = vring.disable_notification() {
                self.warn(format_args!("cannot disable notifications: {e}"));
            }
            self.model.process_queue(queue, vring)?;
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.warn(format_args!("cannot enable notifications: {e}"));
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Puts `heads` on `vring`'s used ring with length 0 (buffers the device
/// only read, or refused) and signals the driver if it asked to be;
/// failures are logged under `name`. Shared by every transmit path.
pub fn complete_read_only(
    mem: &GuestMemoryMmap<()>,
    vring: &VringRwLock,
    heads: impl IntoIterator<Item = u16>,
    name: &dyn fmt::Display,
) -> io::Result<()> {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    let mut added = false;
    for head in heads {
        match queue.add_used(mem, head, 0) {
            Ok(()) => added = true,
            Err(e) => {
                // A guest's used ring it broke: rate-limited.
                static LIMIT: Limiter = Limiter::new(8, std::time::Duration::from_secs(1));
                if let Some(n) = LIMIT.allow() {
                    warn!(port = %name, "cannot add used entry: {e}{}", suppressed_note(n));
                }
            }
        }
    }
    if added {
        match queue.needs_notification(mem) {
            Ok(true) => state.signal_used_queue()?,
            Ok(false) => {}
            Err(e) => warn!(port = %name, "cannot read used_event: {e}"),
        }
    }
    Ok(())
}

/// Refuses any epoll event set but `IN` on a queue's kick.
fn check_kick_events(evset: EventSet) -> io::Result<()> {
    if evset != EventSet::IN {
        return Err(io::Error::other(format!(
            "unexpected epoll events {evset:?}"
        )));
    }
    Ok(())
}

/// Exactly `size` bytes of `config` from `offset` (frontends check the reply
/// length); bytes beyond `config` read as zero.
fn config_bytes(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    (offset..offset.saturating_add(size))
        .map(|i| config.get(i as usize).copied().unwrap_or(0))
        .collect()
}

impl<M: DeviceModel> VhostUserBackendMut for Backend<M> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        M::NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(M::MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | self.model.features()
    }

    fn acked_features(&mut self, features: u64) {
        self.model.acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_bytes(self.model.config(), offset, size)
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match self.exit_fds.create() {
            Ok(pair) => Some(pair),
            Err(e) => {
                M::LOG_KEY.error(
                    &self.model.name(),
                    format_args!("cannot create the worker exit eventfd: {e}"),
                );
                None
            }
        }
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.model.update_memory(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if let Some(role) = M::QUEUE_ROLE {
            partvisor_seccomp::enter_role(role).map_err(io::Error::other)?;
        }
        check_kick_events(evset)?;
        self.model.kicked(vrings);
        let queue = usize::from(device_event);
        let Some(vring) = vrings.get(queue) else {
            M::LOG_KEY.error(
                &self.model.name(),
                format_args!("event for unknown queue {device_event}"),
            );
            return Ok(());
        };
        if !self.model.drains(queue) {
            return Ok(());
        }
        self.drain(queue, vring)
    }
}

/// The consumer ends of the worker exit eventfds a backend hands out in
/// `VhostUserBackendMut::exit_event`.
///
/// `vhost-user-backend` 0.24 turns them into raw fds for its epoll set and
/// never closes them; without this every connection would leak one fd, and a
/// frontend reconnecting in a loop could exhaust the process's fd table for
/// every endpoint.
#[derive(Debug, Default)]
pub struct ExitFds(Mutex<Vec<RawFd>>);

impl ExitFds {
    /// A new exit eventfd pair; the consumer's fd is remembered for
    /// [`ExitFds::close_all`].
    pub fn create(&self) -> io::Result<(EventConsumer, EventNotifier)> {
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        self.0.locked().push(pair.0.as_raw_fd());
        Ok(pair)
    }

    /// Closes every remembered consumer fd.
    ///
    /// # Safety
    ///
    /// Call only after the `VhostUserDaemon` that used these fds has been
    /// dropped (its worker threads are joined then), so nothing uses them.
    pub unsafe fn close_all(&mut self) {
        let fds = self.0.get_mut_unpoisoned();
        for fd in fds.drain(..) {
            // SAFETY: per this function's contract the fd is owned by nobody.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_exactly_the_requested_length_zero_past_the_end() {
        let config = [1u8, 2, 3, 4];
        assert_eq!(config_bytes(&config, 1, 2), vec![2, 3]);
        assert_eq!(config_bytes(&config, 2, 5), vec![3, 4, 0, 0, 0]);
        assert_eq!(config_bytes(&config, 10, 3), vec![0, 0, 0]);
        assert_eq!(config_bytes(&config, u32::MAX, 4), Vec::<u8>::new());
    }

    #[test]
    fn only_an_in_event_is_a_kick() {
        assert!(check_kick_events(EventSet::IN).is_ok());
        let e = check_kick_events(EventSet::IN | EventSet::HANG_UP).unwrap_err();
        assert!(e.to_string().starts_with("unexpected epoll events"), "{e}");
    }
}
