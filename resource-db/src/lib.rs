//! # resource-db: the partvisor resource database
//!
//! The transactional resource map of seed 001 (seeds: ARCHITECTURE.md;
//! "resource database 33", paragraphs 0063, 0098–0099, 0156, 0164): every
//! host resource a partition can be given has exactly one owner at every
//! instant, owners change only through transactions, a transaction is a list
//! of ownership changes whose before images are its preconditions, it
//! commits whole or not at all ("a transaction that has not completed has
//! reserved no resource"), and each committed transaction is kept in an audit
//! log with before and after images from which the state can be rebuilt.
//!
//! ## Resources
//! - CPUs ([`ResourceId::Cpu`]): a host CPU is owned by a partition
//!   (dedicated), by `available`, or by the pseudo-owner `shared-pool`. The
//!   pool's capacity is 1000 milli-CPUs per pool CPU; partitions hold
//!   [`Change::Share`]s of it, whose sum never exceeds the capacity.
//! - Memory ([`ResourceId::Memory`]): MiB extents of a host budget (default
//!   3/4 of `MemTotal`), kept as maximal extents that tile the budget.
//! - vsock CIDs, MAC addresses, devices (backing files, taps), memory channel
//!   slots, interconnect endpoints and uids (the unprivileged identities
//!   partitions' jailed processes run as): unit resources from ranges and
//!   lists in the [`HostConfig`] (discovered with
//!   [`HostConfigExt::discover`], overridable field by field).
//! - Partitions are records (name, opaque JSON definition, state) in the same
//!   store, created and destroyed by changes in transactions.
//!
//! ## API
//! ```no_run
//! use resource_db::{Change, Db, HostConfig, HostConfigExt, Owner, PartitionId, PartitionRecord, PartitionState, ResourceId};
//! # fn main() -> Result<(), resource_db::Error> {
//! let db = Db::open("/var/lib/partvisor/resources.db", HostConfig::discover()?)?;
//! let web = PartitionId::new("web")?;
//! let txid = db.transact("partd", &[
//!     Change::Create { record: PartitionRecord { id: web.clone(), definition: "{}".into(), state: PartitionState::Defined } },
//!     Change::Transfer { resource: ResourceId::VsockCid(3), before: Owner::Available, after: Owner::partition(&web) },
//!     Change::Share { partition: web.clone(), before_milli: 0, after_milli: 500 },
//! ])?;
//! assert_eq!(db.owner(&ResourceId::VsockCid(3))?, Owner::partition(&web));
//! let held = db.holdings(&web)?;      // what `web` holds
//! let free = db.free()?;              // total and free capacity per kind
//! db.check_invariants()?;             // one owner each, totals conserved, pool not over-committed
//! db.check_replay()?;                 // audit log replays to the live tables
//! # let _ = (txid, held, free); Ok(()) }
//! ```
//! - [`Db::open`] / [`Db::open_with`]: the single writer (an exclusive
//!   `flock` on `<path>-lock` keeps a second coordinator out).
//! - [`Db::transact`]: one transaction; [`Error::Rejected`] names the change
//!   and the rule (e.g. [`Rejection::StaleOwner`] with the resource, the
//!   expected and the actual owner), and nothing was applied.
//! - Reads: [`View`] (in the writer's process via [`Db::view`] or the
//!   shortcuts on `Db`, elsewhere via [`View::open`]): `owner`, `holdings`,
//!   `free`, `partition(s)`, `log`, `snapshot`, `replay`,
//!   `check_invariants`, `check_replay`.
//! - Planning (policy, outside the database's rules): [`State::plan_grant`]
//!   turns a [`Demand`] into the changes of one transaction against a
//!   snapshot, or names the first shortage ([`Rejection::Insufficient`]);
//!   [`State::plan_release`] returns everything a partition holds. A plan
//!   made from a stale snapshot is rejected by its before images: plan
//!   again.
//!
//! ## Store: SQLite (rusqlite, `bundled`)
//! Chosen over redb because (1) SQLite's WAL commit path has decades of
//! power-loss and crash testing, and `bundled` pins the exact library version
//! so no host library is involved; (2) `PRIMARY KEY`/`CHECK` constraints
//! enforce part of the invariants (one row, hence one owner, per resource;
//! no empty extents) inside the store itself; (3) operators can inspect the
//! live tables and the audit log with the stock `sqlite3` shell; (4)
//! savepoints make group commit with per-transaction rollback simple. The
//! cost is a C compile of SQLite (gcc), already on every project machine.
//!
//! Layout: live tables `units`, `memory`, `shares`, `partitions`; the audit
//! log `audit_log` (txid, time, actor, JSON before/after images). Each
//! transaction writes both in one SQLite transaction. Entry 1 of the log is
//! the genesis record holding the host configuration, so [`Db::replay`]
//! needs nothing but the log.
//!
//! Durability: WAL with `synchronous=FULL` by default ([`Durability::Full`]):
//! `transact` returns only after the WAL is fsynced. Commits are batched by
//! the writer thread (group commit): the transactions waiting when a commit
//! starts share it, each in its own savepoint.
//!
//! ## Tests and benchmark
//! `cargo test -p resource-db` runs the unit tests, `tests/db.rs` (every
//! rejection path, all-or-nothing, log contents, reopen, locking, tamper
//! detection), `tests/random_sequences.rs` (proptest of random
//! create/grant/release/share/destroy/aborted sequences; invariants and
//! live == replay after every step; `PROPTEST_CASES`, default 64) and
//! `tests/crash.rs` (a child process committing from four threads is
//! SIGKILLed 200 times; after each kill the store reopens, invariants hold,
//! live == replay, no partial transaction is visible and every txid the child
//! reported is in the log; `CRASH_KILLS`, `CRASH_SEED`).
//!
//! `cargo bench -p resource-db --features bench` measures durable
//! transactions/s at 1 and 16 writers (with group commit, without batching,
//! and against 16 SQLite connections committing on their own), relaxed
//! durability for comparison, and the replay time of a 100,000-entry log.
//! Measured figures, with their date and command: `resource-db/README.md`.
//!
//! ## What it must never do
//! - Change an owner, a share or a partition record outside a committed
//!   transaction, or let a rejected transaction leave anything behind.
//! - Make policy decisions in the database itself (which CPU, which extent,
//!   which state follows which): [`Db`] checks preconditions and invariants
//!   only (seed 001, paragraph 0164). The planning helpers are the
//!   coordinator's policy, kept apart; the database never calls them.
//! - Decide when memory may be released: it cannot see who maps a guest's
//!   memory. The coordinator commits a release only after every backend has
//!   disconnected (DESIGN.md: memory is not reused while a backend maps it).
//! - Update or delete audit log entries.
//! - Touch the host: discovery only reads `/proc` and `/sys`.

mod config;
mod db;
mod error;
mod plan;
mod state;
mod store;

pub use config::{DeviceKind, DeviceSpec, HostConfig, HostConfigExt};
pub use db::{Db, Durability, Options, View, WriterStats};
pub use error::{ConfigProblem, Error, Rejection};
/// The resource map's vocabulary is the API's: partd returns it as is.
pub use partvisor_api::{
    Capacity, Change, Extent, FreeCapacity, Holdings, LogEntry, LogRecord, MacAddr, Owner,
    ParseError, PartitionId, PartitionRecord, PartitionState, ResourceId, ResourceKind, TxId,
};
pub use plan::Demand;
pub use state::State;
