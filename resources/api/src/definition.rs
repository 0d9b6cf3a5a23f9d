//! A partition definition: what an operator asks for (`partctl create
//! FILE`, TOML on disk, JSON on the wire). partd checks it against the host
//! (`resource-db/partd`'s `definition` module); this is its form.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest polite-stop timeout a definition or a stop request may ask for,
/// in seconds.
pub const MAX_STOP_TIMEOUT_S: u64 = 3600;
/// Polite-stop timeout when a definition names none, in seconds.
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 10;

fn default_vcpus() -> u32 {
    crate::descriptor::DEFAULT_VCPUS
}

fn default_stop_timeout_s() -> u64 {
    DEFAULT_STOP_TIMEOUT_S
}

/// A partition definition. Unknown keys are refused so a typo never
/// silently changes a partition.
///
/// ```toml
/// name = "web"
/// vcpus = 2
/// memory_mib = 64
/// kernel = "guest.elf"        # relative to the file's folder (partctl resolves it)
/// initrd = "initrd.img"       # optional
/// cmdline = "stay"            # optional
/// cpus = [1]                  # dedicated host CPUs, or:
/// cpu_share = 0.5             # share of the shared pool, in CPUs
/// stop_timeout_s = 10         # polite stop -> forced stop (part-vmm's own timer)
///
/// [[disk]]                    # a virtio-blk disk served by `part-io blk`
/// image = "/srv/web.img"      # a backing file partd manages (partd --disk-image)
/// read_only = false
///
/// [[nic]]                     # a virtio-net port on a `part-io net` switch
/// switch = "lan"              # MAC: assigned from the resource map at create
///
/// [vsock]                     # AF_VSOCK; the CID is granted at start
/// accept = [                  # who may connect to this partition (default: nobody)
///   { from = "web", ports = [5432] },
/// ]
/// ```
///
/// In `cmdline`, `{mac:NAME}` (or `{mac:NAME:I}` for NIC I) stands for the
/// MAC of partition NAME's first (I-th) NIC, and `{cid:NAME}` for the vsock
/// CID of partition NAME (which must be running); partd puts them in at
/// start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_share: Option<f64>,
    #[serde(default = "default_stop_timeout_s")]
    pub stop_timeout_s: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nic: Vec<Nic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// The uid that created the partition, set by partd from the create
    /// request's connection (a definition that gives one is refused). Only
    /// it and root may start, stop, destroy or attach to the partition, and
    /// its kernel, initrd and disks are opened with its rights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
}

/// Guest sockets (virtio-vsock served by `part-io vsock`). The partition
/// gets a CID from the resource map when it starts and gives it back when
/// it stops. Connections are refused unless the listening partition's
/// `accept` names the connecting partition and the port: participation is
/// by allowlist, and it is the listener's to give.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept: Vec<VsockAccept>,
}

/// Partition `from` may connect to these ports of the partition whose
/// definition holds this entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockAccept {
    pub from: String,
    pub ports: Vec<u32>,
}

impl Vsock {
    /// Whether partition `from` may connect to `port` of this partition.
    pub fn accepts(&self, from: &str, port: u32) -> bool {
        self.accept
            .iter()
            .any(|a| a.from == from && a.ports.contains(&port))
    }
}

/// A disk: a backing file the host configuration lists as a device
/// resource (`partd --disk-image PATH`), served by the partition's
/// `part-io blk`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub image: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// A network port on the switch `switch` (one `part-io net` per switch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub switch: String,
}

impl Disk {
    /// The device resource that stands for this image: its path.
    pub fn device_name(&self) -> String {
        self.image.display().to_string()
    }
}
