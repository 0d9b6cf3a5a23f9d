//! Errors. [`Rejection`] is a transaction (or argument) refused by the
//! database's rules: nothing was changed and the caller can act on it.
//! [`Error`] adds everything that can go wrong below the rules: the store, the
//! host, the log.

use std::path::PathBuf;

use crate::{Extent, Owner, PartitionId, PartitionState, ResourceId};

/// A change refused by the database's rules. The transaction holds nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The transaction has no changes.
    #[error("transaction has no changes")]
    EmptyTransaction,
    /// The resource is not part of this host's configuration.
    #[error("unknown resource {resource}: not in the host configuration")]
    UnknownResource {
        /// The resource as given.
        resource: ResourceId,
    },
    /// A memory extent is empty.
    #[error("memory extent {extent} is empty")]
    EmptyExtent {
        /// The extent as given.
        extent: Extent,
    },
    /// A before image does not match the current owner.
    #[error(
        "precondition failed: {resource} is owned by {actual}, the transaction expected {expected}"
    )]
    StaleOwner {
        /// The resource (for memory: the part of the extent whose owner differs).
        resource: ResourceId,
        /// Owner named in the before image.
        expected: Owner,
        /// Owner in the database.
        actual: Owner,
    },
    /// The resource cannot have this owner (only CPUs go to the shared pool).
    #[error("{resource} cannot be owned by {owner}")]
    InvalidOwner {
        /// The resource.
        resource: ResourceId,
        /// The refused owner.
        owner: Owner,
    },
    /// A change names a partition that does not exist.
    #[error("unknown partition {partition}")]
    UnknownPartition {
        /// The partition.
        partition: PartitionId,
    },
    /// Create of a partition that exists.
    #[error("partition {partition} already exists")]
    PartitionExists {
        /// The partition.
        partition: PartitionId,
    },
    /// A share before image does not match.
    #[error("precondition failed: partition {partition} holds {actual_milli} milli-CPUs of the shared pool, the transaction expected {expected_milli}")]
    StaleShare {
        /// The partition.
        partition: PartitionId,
        /// Share named in the before image.
        expected_milli: u32,
        /// Share in the database.
        actual_milli: u32,
    },
    /// The shared pool cannot carry the shares.
    #[error("shared CPU pool over capacity: {requested_milli} milli-CPUs of shares requested, the pool has {capacity_milli}")]
    OverCapacity {
        /// Sum of all shares the change would leave.
        requested_milli: u64,
        /// 1000 × CPUs in the pool after the change.
        capacity_milli: u64,
    },
    /// A state before image does not match.
    #[error("precondition failed: partition {partition} is {actual}, the transaction expected {expected}")]
    StaleState {
        /// The partition.
        partition: PartitionId,
        /// State named in the before image.
        expected: PartitionState,
        /// State in the database.
        actual: PartitionState,
    },
    /// A destroy's before image differs from the stored record.
    #[error("precondition failed: stored record of partition {partition} differs from the destroy's before image (re-read it)")]
    StaleRecord {
        /// The partition.
        partition: PartitionId,
    },
    /// Destroy of a partition that still holds resources.
    #[error(
        "partition {partition} still holds {what}; release it earlier in the same transaction"
    )]
    PartitionNotEmpty {
        /// The partition.
        partition: PartitionId,
        /// The first thing it still holds.
        what: String,
    },
    /// A planned grant needs more of a kind than is free.
    #[error("not enough {what}: {requested} requested, {free} free")]
    Insufficient {
        /// What is short (`memory MiB`, `shared pool milli-CPUs`, `vsock-cid`...).
        what: String,
        /// Amount asked for.
        requested: u64,
        /// Amount free.
        free: u64,
    },
    /// A planned grant names a specific resource someone else holds.
    #[error("{resource} is held by {owner}")]
    Unavailable {
        /// The resource asked for.
        resource: ResourceId,
        /// Its current owner.
        owner: Owner,
    },
    /// A memory extent read spans several owners.
    #[error("{resource} has more than one owner; ask for a smaller extent")]
    MixedOwners {
        /// The extent asked about.
        resource: ResourceId,
    },
    /// A partition definition is not JSON.
    #[error("definition of partition {partition} is not valid JSON: {reason}")]
    InvalidDefinition {
        /// The partition.
        partition: PartitionId,
        /// Parser message.
        reason: String,
    },
    /// A name or address given as text is invalid.
    #[error(transparent)]
    Parse(#[from] partvisor_api::ParseError),
}

/// Everything [`crate::Db`] can return.
/// What is wrong with a host configuration ([`crate::HostConfigExt::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// A CPU list names one CPU twice.
    #[error("{field} lists CPU {cpu} twice")]
    DuplicateCpu {
        /// `cpus` or `shared_pool_cpus`.
        field: &'static str,
        /// The CPU.
        cpu: u32,
    },
    /// The shared pool holds a CPU the host does not.
    #[error("shared pool CPU {cpu} is not in cpus")]
    PoolCpuNotInCpus {
        /// The CPU.
        cpu: u32,
    },
    /// The memory budget does not fit the store's integers.
    #[error("memory_budget_mib {mib} is too large (at most {})", i64::MAX)]
    MemoryBudgetTooLarge {
        /// The budget given.
        mib: u64,
    },
    /// The vsock CID range starts in the reserved CIDs.
    #[error("first_vsock_cid {first} must be at least 3 (0-2 are reserved)")]
    VsockCidReserved {
        /// The first CID given.
        first: u32,
    },
    /// The vsock CID range runs past the largest CID.
    #[error("vsock CID range {first} + {count} runs past 2^32-2")]
    VsockRangeOverflow {
        /// First CID.
        first: u32,
        /// Number of CIDs.
        count: u32,
    },
    /// The first MAC is not a locally administered unicast address.
    #[error("first_mac {mac} must be locally administered unicast (first byte x2, x6, xa or xe)")]
    MacNotLocalUnicast {
        /// The MAC given.
        mac: crate::MacAddr,
    },
    /// The MAC range leaves the first MAC's low 24 bits.
    #[error("MAC range of {count} from {first} runs past the low 24 bits of first_mac")]
    MacRangeOverflow {
        /// First MAC.
        first: crate::MacAddr,
        /// Number of MACs.
        count: u32,
    },
    /// The uid range holds uid 0 or runs past the largest uid.
    #[error("uid range of {count} from {first} must not hold uid 0 or run past 2^32-2")]
    UidRange {
        /// First uid.
        first: u32,
        /// Number of uids.
        count: u32,
    },
    /// The I/O partitions' uid is 0 or one of the partitions' uids.
    #[error("io_uid {uid} must not be 0 or inside the partitions' uid range")]
    IoUid {
        /// The uid given.
        uid: u32,
    },
    /// A device name is empty, too long or not printable.
    #[error("device name {name:?} must be 1-128 printable characters")]
    DeviceName {
        /// The name given.
        name: String,
    },
    /// Two devices share a name.
    #[error("device {name} is listed twice")]
    DuplicateDevice {
        /// The name.
        name: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Change number `index` (0-based) of the transaction was refused; the
    /// transaction was not applied.
    #[error("transaction rejected at change #{index}: {reason}")]
    Rejected {
        /// Index of the refused change.
        index: usize,
        /// Why.
        reason: Rejection,
    },
    /// A read or argument was refused.
    #[error(transparent)]
    Invalid(#[from] Rejection),
    /// The host configuration is not usable.
    #[error("invalid host configuration: {0}")]
    InvalidConfig(#[from] ConfigProblem),
    /// Reading the host failed during discovery.
    #[error("cannot discover host configuration from {path}: {reason}")]
    Discovery {
        /// File read.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The store was created for another host configuration.
    #[error("store {path} was created with a different host configuration (differs in: {fields}); open it with the stored configuration (Db::stored_host_config) or move it aside")]
    HostConfigChanged {
        /// Store path.
        path: PathBuf,
        /// Names of the differing fields.
        fields: String,
    },
    /// Another process holds the writer lock.
    #[error("store {path} is already open for writing by another process (lock {lock})")]
    Locked {
        /// Store path.
        path: PathBuf,
        /// Lock file.
        lock: PathBuf,
    },
    /// I/O on the store's files.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The embedded store failed.
    #[error("store error while {context}: {source}")]
    Store {
        /// What the database was doing.
        context: &'static str,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The batch this transaction was committed with failed; nothing of it
    /// was applied.
    #[error("commit failed, transaction not applied: {0}")]
    CommitFailed(String),
    /// The stored data contradicts itself (not produced by this crate, or damaged).
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// `check_invariants` found violations.
    #[error("invariants violated: {}", .0.join("; "))]
    InvariantsViolated(Vec<String>),
    /// The writer thread is gone (it panicked or the database is closing).
    #[error("database writer thread is not running")]
    WriterGone,
}

impl Error {
    pub(crate) fn store(context: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
        move |source| Error::Store { context, source }
    }

    /// The rule that refused the transaction, if that is why it failed.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Error::Rejected { reason, .. } | Error::Invalid(reason) => Some(reason),
            _ => None,
        }
    }
}

/// A name or address that does not parse is refused like any other input.
impl From<partvisor_api::ParseError> for Error {
    fn from(e: partvisor_api::ParseError) -> Self {
        Error::Invalid(Rejection::Parse(e))
    }
}
