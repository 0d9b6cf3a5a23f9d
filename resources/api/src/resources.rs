//! Identifiers, owners, resources and changes: the vocabulary of the
//! resource map, as the database stores it and partd's API returns it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ParseError;

/// Name of a partition.
///
/// 1 to 64 characters from `[a-z0-9_.-]`, starting with a letter or digit, and
/// never one of the pseudo-partition names `available` or `shared-pool`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PartitionId(String);

impl PartitionId {
    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, ParseError> {
        let valid_chars = name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
        let valid_start = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if name.len() > 64 || !valid_chars || !valid_start || Owner::pseudo_name(name) {
            return Err(ParseError::PartitionId {
                name: name.to_owned(),
            });
        }
        Ok(PartitionId(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PartitionId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        PartitionId::new(&s)
    }
}

impl From<PartitionId> for String {
    fn from(p: PartitionId) -> String {
        p.0
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Owner of a resource: a partition or a pseudo-partition.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Owner {
    /// Unassigned (seed 001: the `available` partition).
    Available,
    /// A host CPU lent to the shared pool; partitions hold milli-CPU shares of
    /// the pool rather than the CPU itself. Only CPUs can have this owner.
    SharedPool,
    /// A real partition.
    Partition(PartitionId),
}

impl Owner {
    const AVAILABLE: &'static str = "available";
    const SHARED_POOL: &'static str = "shared-pool";

    fn pseudo_name(name: &str) -> bool {
        name == Self::AVAILABLE || name == Self::SHARED_POOL
    }

    /// Shorthand for `Owner::Partition(id.clone())`.
    pub fn partition(id: &PartitionId) -> Self {
        Owner::Partition(id.clone())
    }

    /// The partition, if this owner is one.
    pub fn as_partition(&self) -> Option<&PartitionId> {
        match self {
            Owner::Partition(p) => Some(p),
            _ => None,
        }
    }
}

impl FromStr for Owner {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            Self::AVAILABLE => Ok(Owner::Available),
            Self::SHARED_POOL => Ok(Owner::SharedPool),
            other => PartitionId::new(other).map(Owner::Partition),
        }
    }
}

impl TryFrom<String> for Owner {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<Owner> for String {
    fn from(o: Owner) -> String {
        o.to_string()
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Available => f.write_str(Self::AVAILABLE),
            Owner::SharedPool => f.write_str(Self::SHARED_POOL),
            Owner::Partition(p) => write!(f, "{p}"),
        }
    }
}

/// An Ethernet MAC address; on the wire and in messages `02:00:00:00:00:0a`.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A group (broadcast or multicast) address: the I/G bit is set.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The address as a 48-bit number.
    pub fn to_u64(self) -> u64 {
        self.0.iter().fold(0, |acc, b| (acc << 8) | u64::from(*b))
    }

    /// The address whose 48-bit number is `v` (upper 16 bits ignored).
    pub fn from_u64(v: u64) -> Self {
        let b = v.to_be_bytes();
        MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

impl FromStr for MacAddr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError::Mac { text: s.to_owned() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A contiguous range of the host memory budget, in MiB: `[start_mib, start_mib + len_mib)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// First MiB of the extent, counted from the start of the budget.
    pub start_mib: u64,
    /// Length in MiB; a valid extent is never empty.
    pub len_mib: u64,
}

impl Extent {
    /// `[start_mib, start_mib + len_mib)`.
    pub fn new(start_mib: u64, len_mib: u64) -> Self {
        Extent { start_mib, len_mib }
    }

    /// One past the last MiB (saturating).
    pub fn end_mib(&self) -> u64 {
        self.start_mib.saturating_add(self.len_mib)
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}) MiB", self.start_mib, self.end_mib())
    }
}

/// The kinds of resources the database tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    /// A whole host CPU.
    Cpu,
    /// Host memory budget, in MiB extents.
    Memory,
    /// A vsock context id.
    VsockCid,
    /// A MAC address.
    Mac,
    /// A host device (backing file, tap).
    Device,
    /// A memory channel slot.
    Channel,
    /// An interconnect endpoint.
    Endpoint,
    /// A uid (and the gid of the same number) a partition's jailed
    /// processes run as.
    Uid,
}

impl ResourceKind {
    /// The kind's name as stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Cpu => "cpu",
            ResourceKind::Memory => "memory",
            ResourceKind::VsockCid => "vsock-cid",
            ResourceKind::Mac => "mac",
            ResourceKind::Device => "device",
            ResourceKind::Channel => "channel",
            ResourceKind::Endpoint => "endpoint",
            ResourceKind::Uid => "uid",
        }
    }
}

impl ResourceKind {
    /// Every kind, in declaration order.
    pub const ALL: [ResourceKind; 8] = [
        ResourceKind::Cpu,
        ResourceKind::Memory,
        ResourceKind::VsockCid,
        ResourceKind::Mac,
        ResourceKind::Device,
        ResourceKind::Channel,
        ResourceKind::Endpoint,
        ResourceKind::Uid,
    ];

    /// Inverse of [`ResourceKind::as_str`].
    pub fn from_name(name: &str) -> Option<ResourceKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One ownable resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceId {
    /// Host CPU number (as in `/sys/devices/system/cpu/cpuN`).
    Cpu(u32),
    /// An extent of the host memory budget.
    Memory(Extent),
    /// A vsock context id.
    VsockCid(u32),
    /// A MAC address.
    Mac(MacAddr),
    /// A host device, by its configured name.
    Device(String),
    /// A memory channel slot.
    Channel(u32),
    /// An interconnect endpoint.
    Endpoint(u32),
    /// A uid (with the gid of the same number) for jailed processes.
    Uid(u32),
}

impl ResourceId {
    /// The kind of this resource.
    pub fn kind(&self) -> ResourceKind {
        match self {
            ResourceId::Cpu(_) => ResourceKind::Cpu,
            ResourceId::Memory(_) => ResourceKind::Memory,
            ResourceId::VsockCid(_) => ResourceKind::VsockCid,
            ResourceId::Mac(_) => ResourceKind::Mac,
            ResourceId::Device(_) => ResourceKind::Device,
            ResourceId::Channel(_) => ResourceKind::Channel,
            ResourceId::Endpoint(_) => ResourceKind::Endpoint,
            ResourceId::Uid(_) => ResourceKind::Uid,
        }
    }

    /// The text naming a unit resource within its kind (`3`, `disk0`,
    /// `02:70:76:00:00:01`); `None` for memory, which is counted in extents.
    pub fn unit_key(&self) -> Option<String> {
        match self {
            ResourceId::Cpu(n)
            | ResourceId::VsockCid(n)
            | ResourceId::Channel(n)
            | ResourceId::Endpoint(n)
            | ResourceId::Uid(n) => Some(n.to_string()),
            ResourceId::Mac(m) => Some(m.to_string()),
            ResourceId::Device(name) => Some(name.clone()),
            ResourceId::Memory(_) => None,
        }
    }

    /// Inverse of (`kind().as_str()`, `unit_key()`).
    pub fn from_unit(kind: &str, key: &str) -> Option<ResourceId> {
        let num = || key.parse::<u32>().ok();
        Some(match kind {
            "cpu" => ResourceId::Cpu(num()?),
            "vsock-cid" => ResourceId::VsockCid(num()?),
            "channel" => ResourceId::Channel(num()?),
            "endpoint" => ResourceId::Endpoint(num()?),
            "uid" => ResourceId::Uid(num()?),
            "mac" => ResourceId::Mac(key.parse().ok()?),
            "device" => ResourceId::Device(key.to_owned()),
            _ => return None,
        })
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceId::Memory(e) => write!(f, "memory {e}"),
            other => write!(
                f,
                "{} {}",
                other.kind(),
                other.unit_key().unwrap_or_default()
            ),
        }
    }
}

/// Life-cycle state of a partition. The database records it; it does not
/// impose transitions (seed 001: "the low level mechanism does not make
/// policy decisions"). Each change names the state it expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionState {
    /// Defined, holding resources or not, not running.
    Defined,
    /// Its backends and monitor are being started.
    Starting,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped; memory may still be mapped by backends.
    Stopped,
    /// Failed; see the supervisor's log.
    Failed,
    /// Running but not answering its supervisor.
    Unresponsive,
}

impl PartitionState {
    /// The state's name as stored and shown (`defined`, `running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionState::Defined => "defined",
            PartitionState::Starting => "starting",
            PartitionState::Running => "running",
            PartitionState::Stopping => "stopping",
            PartitionState::Stopped => "stopped",
            PartitionState::Failed => "failed",
            PartitionState::Unresponsive => "unresponsive",
        }
    }
}

impl fmt::Display for PartitionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A partition as stored: its definition (opaque JSON owned by the
/// coordinator) and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    /// The partition's name.
    pub id: PartitionId,
    /// The definition the operator gave, as JSON text. Stored verbatim.
    pub definition: String,
    /// Current state.
    pub state: PartitionState,
}

/// One change in a transaction. Every change carries its before image, which
/// is a precondition: the transaction commits only if, at the point where the
/// change is applied (after the earlier changes of the same transaction), the
/// database holds exactly that image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Move a resource from `before` to `after`. For memory, every MiB of the
    /// extent must be owned by `before`. `before == after` asserts ownership
    /// without changing it.
    Transfer {
        /// The resource.
        resource: ResourceId,
        /// Expected current owner.
        before: Owner,
        /// New owner.
        after: Owner,
    },
    /// Set a partition's share of the shared CPU pool, in milli-CPUs.
    Share {
        /// The partition.
        partition: PartitionId,
        /// Expected current share (0 when it has none).
        before_milli: u32,
        /// New share (0 releases it).
        after_milli: u32,
    },
    /// Create a partition. Before image: no partition of that name.
    Create {
        /// The new record.
        record: PartitionRecord,
    },
    /// Change a partition's state.
    SetState {
        /// The partition.
        partition: PartitionId,
        /// Expected current state.
        before: PartitionState,
        /// New state.
        after: PartitionState,
    },
    /// Destroy a partition that holds nothing (release its resources earlier
    /// in the same transaction). Before image: the full stored record.
    Destroy {
        /// Expected current record.
        record: PartitionRecord,
    },
}

/// Id of a committed transaction: its position in the audit log (1 is the
/// genesis entry that records the host configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxId(pub u64);

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_id_rejects_pseudo_names_and_bad_characters() {
        for bad in [
            "",
            "available",
            "shared-pool",
            "Upper",
            "-lead",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(PartitionId::new(bad), Err(ParseError::PartitionId { .. })),
                "{bad:?} accepted"
            );
        }
        assert_eq!(PartitionId::new("web-1.a_b").unwrap().as_str(), "web-1.a_b");
    }

    #[test]
    fn owner_round_trips_through_text() {
        let p = PartitionId::new("p1").unwrap();
        for o in [Owner::Available, Owner::SharedPool, Owner::Partition(p)] {
            assert_eq!(o.to_string().parse::<Owner>().unwrap(), o);
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Owner>(&json).unwrap(), o);
        }
    }

    #[test]
    fn mac_parses_formats_and_converts() {
        let m: MacAddr = "02:70:76:00:01:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:70:76:00:01:ff");
        assert_eq!(
            MacAddr::from_u64(m.to_u64() + 1).to_string(),
            "02:70:76:00:02:00"
        );
        for bad in [
            "02:70:76:00:01",
            "02:70:76:00:01:ff:00",
            "0g:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn unit_resource_keys_round_trip() {
        let ids = [
            ResourceId::Cpu(3),
            ResourceId::VsockCid(7),
            ResourceId::Mac(MacAddr([2, 0, 0, 0, 0, 9])),
            ResourceId::Device("disk0".into()),
            ResourceId::Channel(1),
            ResourceId::Endpoint(2),
        ];
        for id in ids {
            let key = id.unit_key().unwrap();
            assert_eq!(ResourceId::from_unit(id.kind().as_str(), &key), Some(id));
        }
        assert_eq!(ResourceId::Memory(Extent::new(0, 4)).unit_key(), None);
        assert_eq!(
            ResourceId::Memory(Extent::new(512, 256)).to_string(),
            "memory [512, 768) MiB"
        );
    }
}
