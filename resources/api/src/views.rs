//! partd's HTTP API bodies: what `partctl` sends and what partd answers
//! (`resources/api/partd.openapi.yaml` documents each route).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::control::ExitRecord;
use crate::definition::Definition;
use crate::holdings::Holdings;
use crate::resources::PartitionState;

/// A partition as partd reports it (`GET /v1/partitions/{name}`, and the
/// reply to create, start and stop).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionView {
    pub name: String,
    pub state: PartitionState,
    /// The definition as partd stored it (relative paths resolved).
    pub definition: Definition,
    pub holdings: Holdings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmView>,
    /// How the last monitor ended (part-vmm's exit record, or partd's when
    /// it left none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitRecord>,
    /// The part-io processes serving its disks and NICs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io: Vec<IoView>,
    /// Only in the reply to a start: where its time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timings: Option<StartTimings>,
}

/// Where the time of one start went, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTimings {
    /// Checks, planning and the grant transaction (durable).
    pub grant_us: u64,
    /// Starting the part-io backends and waiting until they listen.
    #[serde(default)]
    pub io_us: u64,
    /// Descriptor memfd, state files and fork/exec of part-vmm.
    pub spawn_us: u64,
    /// From the spawn until the monitor first answered a ping: the
    /// monitor's own share (exec, KVM setup, control socket).
    pub monitor_us: u64,
    /// Recording `running` (durable) and building the reply.
    pub running_us: u64,
    /// The whole start inside partd.
    pub total_us: u64,
}

/// The running monitor of a partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmView {
    pub pid: u32,
    /// Start time of the process (clock ticks since boot, as in
    /// `/proc/PID/stat`), so a reused pid is never mistaken for it.
    pub start_time: u64,
    pub control_socket: PathBuf,
    pub console_socket: PathBuf,
    /// The cgroup weighting its share of the shared pool, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// Which device model a part-io process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoKind {
    /// `part-io blk`: one partition's disks.
    Blk,
    /// `part-io net`: a switch, shared by the partitions on it.
    Net,
    /// `part-io vsock`: the host's guest-socket relay, shared by every
    /// partition with a `[vsock]` section.
    Vsock,
}

impl fmt::Display for IoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoKind::Blk => "blk",
            IoKind::Net => "net",
            IoKind::Vsock => "vsock",
        })
    }
}

/// A part-io process serving a partition's disks (`blk`), a switch its
/// NICs are on (`net`) or its guest sockets (`vsock`: sockets are its
/// vhost-user socket, then its hybrid host socket).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoView {
    pub kind: IoKind,
    /// The switch (net only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    pub pid: u32,
    pub start_time: u64,
    /// False once the process is gone: its guests' devices need reset.
    pub alive: bool,
    pub sockets: Vec<PathBuf>,
    pub log: PathBuf,
}

/// `POST /v1/partitions/{name}/start`: no fields (an empty body is fine).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {}

/// `POST /v1/partitions/{name}/stop`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    /// Stop at once instead of pressing the ACPI power button.
    #[serde(default)]
    pub force: bool,
    /// Polite-stop timeout overriding the definition's, at most
    /// [`crate::definition::MAX_STOP_TIMEOUT_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// `GET /v1/log` query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Only the entries that touch this partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// The newest this many entries (partd's default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// The body of every 4xx and 5xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do about it.
    pub error: String,
}
