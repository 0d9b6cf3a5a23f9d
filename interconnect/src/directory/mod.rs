//! The directory service: where named endpoints are found, who may reach
//! them, and whose names they are.
//!
//! Every name belongs to one uid. A process claims the name it runs as
//! ([`Directory::claim`], done by [`Context::open`](crate::Context::open))
//! and registers the names it listens on ([`Directory::register`]); only
//! that uid (or root) may register, replace or remove the name afterwards,
//! and only that uid (or root) may resolve peers *as* that name. Names are
//! first come, first served unless root reserved them for a uid beforehand
//! ([`MemDirectory::reserve`]; partd is to reserve each partition's name
//! for the partition's uid once it hosts the directory, which it does not
//! yet), so a service can be sure who answers to an allowlisted name.
//! Resolving hands out the pair secret the peer proves itself with at
//! connect ([`crate::proof`]). When a name changes hands (unregistered, or
//! reserved for another uid) every endpoint that allows it gets a new key,
//! so the secrets its former holder got stop working; listeners fetch their
//! current key at each connection. A listener that closes withdraws its
//! endpoint and keeps the name.
//!
//! [`Directory`] is the trait the access layer uses; [`MemDirectory`] is
//! the in-process implementation, [`DirectoryServer`] serves one on a Unix
//! socket taking each caller's uid from the kernel (`SO_PEERCRED`), and
//! [`DirectoryClient`] talks to that server. Who may connect to the socket
//! at all is the file's permissions, set by whoever runs the server.
//!
//! What it must never do: let a uid act for a name another uid holds, hand a
//! pair secret to anyone but the owner of the pair's first name, or grow
//! without bound.

mod server;

use partvisor_runtime::sync::MutexExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use server::{DirectoryClient, DirectoryServer};

use crate::proof::{ListenerKey, PairSecret};
use crate::{IcError, Result};

/// Names one directory holds at most.
pub const MAX_NAMES: usize = 65536;
/// Names one uid (other than root) may hold at most.
pub const MAX_NAMES_PER_UID: usize = 1024;
/// Names one endpoint's allowlist may hold at most.
pub const MAX_ALLOW: usize = 256;
/// Longest host id an endpoint may give.
pub const MAX_HOST_ID: usize = 128;
/// What the endpoints of one uid (other than root) may take in the
/// directory, counted as the bytes of their names, paths and allowlists.
pub const MAX_ENDPOINT_BYTES_PER_UID: usize = 1 << 20;

/// A registered endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Unique name.
    pub name: String,
    /// Host identity (boot id): same host means the shm transport applies.
    pub host_id: String,
    /// Unix socket of the shm port.
    pub shm_path: Option<PathBuf>,
    /// Address of the tcp port.
    pub tcp_addr: Option<SocketAddr>,
    /// Endpoint names allowed to connect.
    pub allow: Vec<String>,
}

/// What resolving a name gives its caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// Where the endpoint listens.
    pub endpoint: Endpoint,
    /// The secret the caller proves its name with when it connects.
    pub secret: PairSecret,
}

/// Name service with ownership and an allowlist check on every lookup.
pub trait Directory: Send + Sync {
    /// Claims `name` for the caller's uid (a no-op if it already holds it).
    fn claim(&self, name: &str) -> Result<()>;
    /// Adds or replaces the caller's endpoint; returns the key its listener
    /// checks peers' proofs with.
    fn register(&self, ep: Endpoint) -> Result<ListenerKey>;
    /// Removes the caller's endpoint `name` but keeps the name the
    /// caller's (a listener that closes).
    fn withdraw(&self, name: &str) -> Result<()>;
    /// Removes the caller's name and its endpoint: anyone may claim it next.
    fn unregister(&self, name: &str) -> Result<()>;
    /// The current key of the caller's endpoint `name`. The directory
    /// changes an endpoint's key when a name on its allowlist changes hands
    /// (so the secrets the former holder got stop working); a listener
    /// whose peer's proof fails asks for it once.
    fn key(&self, name: &str) -> Result<ListenerKey>;
    /// Looks up `to` on behalf of `from`, which the caller must hold;
    /// refused unless `from` is on `to`'s allowlist.
    fn resolve(&self, from: &str, to: &str) -> Result<Resolved>;
}

struct Entry {
    owner: u32,
    endpoint: Option<(Endpoint, ListenerKey)>,
}

impl Entry {
    /// Whether `caller` may act on this entry, the name `name`: its owner
    /// or root.
    fn allows(&self, name: &str, caller: u32) -> Result<()> {
        if self.owner == caller || caller == 0 {
            Ok(())
        } else {
            Err(refused_owner(name, self.owner, caller))
        }
    }
}

#[derive(Default)]
struct Names {
    entries: HashMap<String, Entry>,
    per_uid: HashMap<u32, usize>,
    /// Bytes of each uid's endpoints ([`endpoint_bytes`]).
    bytes_per_uid: HashMap<u32, usize>,
}

/// What an endpoint takes in the directory, roughly: its strings plus a
/// fixed overhead.
fn endpoint_bytes(ep: &Endpoint) -> usize {
    64 + ep.name.len()
        + ep.host_id.len()
        + ep.shm_path.as_ref().map_or(0, |p| p.as_os_str().len())
        + ep.allow.iter().map(|a| a.len() + 24).sum::<usize>()
}

/// In-memory directory. Used in-process through [`Directory`] (the caller
/// is this process's uid) or by a server through the `*_as` methods with
/// the uid the kernel reported.
#[derive(Default)]
pub struct MemDirectory {
    names: Mutex<Names>,
}

impl std::fmt::Debug for MemDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDirectory")
            .field("names", &self.names.locked().entries.len())
            .finish()
    }
}

fn refused_owner(name: &str, owner: u32, caller: u32) -> IcError {
    IcError::Refused(format!(
        "the name {name:?} belongs to uid {owner}, not to uid {caller}"
    ))
}

impl Names {
    /// The entry of `name` for `caller`, created if the name is free.
    fn held_by(&mut self, caller: u32, name: &str) -> Result<&mut Entry> {
        valid_name(name)?;
        match self.entries.get(name) {
            Some(e) => e.allows(name, caller)?,
            None => self.insert(name, caller)?,
        }
        self.entries
            .get_mut(name)
            .ok_or_else(|| IcError::UnknownEndpoint(name.into()))
    }

    /// Whether `owner` may take one more name (`replacing` one entry).
    fn room_for(&self, owner: u32, replacing: bool) -> Result<()> {
        let total = self.entries.len() - usize::from(replacing);
        if total >= MAX_NAMES {
            return Err(IcError::Refused(format!(
                "the directory holds {MAX_NAMES} names already"
            )));
        }
        let n = self.per_uid.get(&owner).copied().unwrap_or(0);
        if owner != 0 && n >= MAX_NAMES_PER_UID {
            return Err(IcError::Refused(format!(
                "uid {owner} holds {MAX_NAMES_PER_UID} names already; unregister some"
            )));
        }
        Ok(())
    }

    /// New keys for every endpoint that lets `name` in: `name` changed
    /// hands, and what its former holder was given must stop working.
    fn rotate_for(&mut self, name: &str) -> Result<()> {
        for e in self.entries.values_mut() {
            if let Some((ep, key)) = e.endpoint.as_mut() {
                if ep.allow.iter().any(|a| a == name) {
                    *key = ListenerKey::generate()?;
                }
            }
        }
        Ok(())
    }

    fn insert(&mut self, name: &str, owner: u32) -> Result<()> {
        if self.entries.len() >= MAX_NAMES {
            return Err(IcError::Refused(format!(
                "the directory holds {MAX_NAMES} names already"
            )));
        }
        let n = self.per_uid.entry(owner).or_default();
        if owner != 0 && *n >= MAX_NAMES_PER_UID {
            return Err(IcError::Refused(format!(
                "uid {owner} holds {MAX_NAMES_PER_UID} names already; unregister some"
            )));
        }
        *n += 1;
        self.entries.insert(
            name.into(),
            Entry {
                owner,
                endpoint: None,
            },
        );
        Ok(())
    }

    /// Sets (or clears) the endpoint of the entry `name` held by `owner`,
    /// within the owner's byte budget.
    fn set_endpoint(
        &mut self,
        name: &str,
        owner: u32,
        endpoint: Option<(Endpoint, ListenerKey)>,
    ) -> Result<()> {
        let new = endpoint.as_ref().map_or(0, |(ep, _)| endpoint_bytes(ep));
        let old = self
            .entries
            .get(name)
            .and_then(|e| e.endpoint.as_ref())
            .map_or(0, |(ep, _)| endpoint_bytes(ep));
        let used = self.bytes_per_uid.get(&owner).copied().unwrap_or(0);
        let after = used.saturating_sub(old) + new;
        if owner != 0 && after > MAX_ENDPOINT_BYTES_PER_UID && new > old {
            return Err(IcError::Refused(format!(
                "uid {owner}'s endpoints would take {after} bytes, more than \
                 {MAX_ENDPOINT_BYTES_PER_UID}; withdraw some or shorten their allowlists"
            )));
        }
        let Some(e) = self.entries.get_mut(name) else {
            return Err(IcError::UnknownEndpoint(name.into()));
        };
        e.endpoint = endpoint;
        if after == 0 {
            self.bytes_per_uid.remove(&owner);
        } else {
            self.bytes_per_uid.insert(owner, after);
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            let owner = e.owner;
            let _ = self.set_endpoint(name, owner, None);
        }
        if let Some(e) = self.entries.remove(name) {
            if let Some(n) = self.per_uid.get_mut(&e.owner) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_uid.remove(&e.owner);
                }
            }
        }
    }
}

fn valid_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 || name.contains(['/', '\0']) {
        return Err(IcError::InvalidArgument(format!(
            "endpoint name {name:?} must be 1-200 chars without '/' or NUL"
        )));
    }
    Ok(())
}

impl MemDirectory {
    /// [`Directory::claim`] for `caller`.
    pub fn claim_as(&self, caller: u32, name: &str) -> Result<()> {
        self.names.locked().held_by(caller, name).map(|_| ())
    }

    /// [`Directory::register`] for `caller`. The endpoint gets a new key, so
    /// secrets handed out for an earlier registration stop working.
    pub fn register_as(&self, caller: u32, ep: Endpoint) -> Result<ListenerKey> {
        if ep.allow.len() > MAX_ALLOW {
            return Err(IcError::InvalidArgument(format!(
                "an allowlist of {} names is more than {MAX_ALLOW}",
                ep.allow.len()
            )));
        }
        if ep.host_id.len() > MAX_HOST_ID {
            return Err(IcError::InvalidArgument(format!(
                "a host id of {} bytes is more than {MAX_HOST_ID}",
                ep.host_id.len()
            )));
        }
        for a in &ep.allow {
            valid_name(a)?;
        }
        let key = ListenerKey::generate()?;
        let mut names = self.names.locked();
        let owner = names.held_by(caller, &ep.name)?.owner;
        let name = ep.name.clone();
        names.set_endpoint(&name, owner, Some((ep, key.clone())))?;
        Ok(key)
    }

    /// [`Directory::withdraw`] for `caller`.
    pub fn withdraw_as(&self, caller: u32, name: &str) -> Result<()> {
        let mut names = self.names.locked();
        if let Some(e) = names.entries.get(name) {
            e.allows(name, caller)?;
            let owner = e.owner;
            names.set_endpoint(name, owner, None)?;
        }
        Ok(())
    }

    /// [`Directory::unregister`] for `caller`; unknown names are not an
    /// error (removal is idempotent).
    pub fn unregister_as(&self, caller: u32, name: &str) -> Result<()> {
        let mut names = self.names.locked();
        if let Some(e) = names.entries.get(name) {
            e.allows(name, caller)?;
            names.rotate_for(name)?;
            names.remove(name);
        }
        Ok(())
    }

    /// [`Directory::key`] for `caller`.
    pub fn key_as(&self, caller: u32, name: &str) -> Result<ListenerKey> {
        let names = self.names.locked();
        let e = names
            .entries
            .get(name)
            .ok_or_else(|| IcError::UnknownEndpoint(name.into()))?;
        e.allows(name, caller)?;
        e.endpoint
            .as_ref()
            .map(|(_, key)| key.clone())
            .ok_or_else(|| IcError::UnknownEndpoint(name.into()))
    }

    /// Gives `name` to `uid` before anyone claims it; only root may. A name
    /// already held by another uid loses its endpoint, and the secrets its
    /// holder was given stop working.
    pub fn reserve_as(&self, caller: u32, name: &str, uid: u32) -> Result<()> {
        if caller != 0 {
            return Err(IcError::Refused(format!(
                "only root may reserve names (uid {caller} asked for {name:?})"
            )));
        }
        valid_name(name)?;
        let mut names = self.names.locked();
        let held = names.entries.get(name).map(|e| e.owner);
        if held == Some(uid) {
            return Ok(());
        }
        names.room_for(uid, held.is_some())?;
        if held.is_some() {
            names.rotate_for(name)?;
            names.remove(name);
        }
        names.insert(name, uid)
    }

    /// [`MemDirectory::reserve_as`] by this process.
    pub fn reserve(&self, name: &str, uid: u32) -> Result<()> {
        self.reserve_as(partvisor_runtime::peer::own_uid(), name, uid)
    }

    /// [`Directory::resolve`] for `caller`.
    pub fn resolve_as(&self, caller: u32, from: &str, to: &str) -> Result<Resolved> {
        let names = self.names.locked();
        match names.entries.get(from) {
            Some(e) => e.allows(from, caller)?,
            None if caller == 0 => {}
            None => {
                return Err(IcError::Refused(format!(
                    "uid {caller} does not hold the name {from:?}; claim it first"
                )))
            }
        }
        let (ep, key) = names
            .entries
            .get(to)
            .and_then(|e| e.endpoint.as_ref())
            .ok_or_else(|| IcError::UnknownEndpoint(to.into()))?;
        if !ep.allow.iter().any(|a| a == from) {
            return Err(IcError::Refused(format!(
                "{from:?} is not on the allowlist of {to:?}"
            )));
        }
        Ok(Resolved {
            endpoint: ep.clone(),
            secret: key.pair_secret(from),
        })
    }
}

impl Directory for MemDirectory {
    fn claim(&self, name: &str) -> Result<()> {
        self.claim_as(partvisor_runtime::peer::own_uid(), name)
    }

    fn register(&self, ep: Endpoint) -> Result<ListenerKey> {
        self.register_as(partvisor_runtime::peer::own_uid(), ep)
    }

    fn withdraw(&self, name: &str) -> Result<()> {
        self.withdraw_as(partvisor_runtime::peer::own_uid(), name)
    }

    fn unregister(&self, name: &str) -> Result<()> {
        self.unregister_as(partvisor_runtime::peer::own_uid(), name)
    }

    fn key(&self, name: &str) -> Result<ListenerKey> {
        self.key_as(partvisor_runtime::peer::own_uid(), name)
    }

    fn resolve(&self, from: &str, to: &str) -> Result<Resolved> {
        self.resolve_as(partvisor_runtime::peer::own_uid(), from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, allow: &[&str]) -> Endpoint {
        Endpoint {
            name: name.into(),
            host_id: "h".into(),
            shm_path: None,
            tcp_addr: None,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_name_held_by_one_uid_cannot_be_replaced_removed_or_used_by_another() {
        let d = MemDirectory::default();
        d.register_as(1000, ep("db", &["app"])).unwrap();
        d.claim_as(1001, "app").unwrap();
        let e = d.register_as(1001, ep("db", &["evil"])).unwrap_err();
        assert!(e.to_string().contains("belongs to uid 1000"), "{e}");
        assert!(d.unregister_as(1001, "db").is_err());
        assert!(d.claim_as(1001, "db").is_err());
        // The owner of "app" resolves as "app"; nobody else does.
        let r = d.resolve_as(1001, "app", "db").unwrap();
        assert_eq!(r.endpoint.allow, vec!["app".to_string()]);
        let e = d.resolve_as(1002, "app", "db").unwrap_err();
        assert!(e.to_string().contains("belongs to uid 1001"), "{e}");
        let e = d.resolve_as(1002, "ghost", "db").unwrap_err();
        assert!(e.to_string().contains("claim it first"), "{e}");
        // Root may act for anyone; the owner may remove its own name.
        assert_eq!(d.resolve_as(0, "app", "db").unwrap(), r);
        d.unregister_as(1000, "db").unwrap();
        assert!(matches!(
            d.resolve_as(1001, "app", "db"),
            Err(IcError::UnknownEndpoint(_))
        ));
        // The freed name is anyone's again.
        d.claim_as(1002, "db").unwrap();
    }

    #[test]
    fn a_reserved_name_goes_only_to_its_uid_and_only_root_reserves() {
        let d = MemDirectory::default();
        d.reserve_as(0, "web", 3000).unwrap();
        assert!(d.claim_as(4000, "web").is_err());
        d.claim_as(3000, "web").unwrap();
        let e = d.reserve_as(3000, "db", 3000).unwrap_err();
        assert!(e.to_string().contains("only root"), "{e}");
        // Reserving a held name for someone else takes it away.
        d.register_as(4000, ep("db", &["web"])).unwrap();
        d.reserve_as(0, "db", 3001).unwrap();
        assert!(matches!(
            d.resolve_as(3000, "web", "db"),
            Err(IcError::UnknownEndpoint(_))
        ));
        assert!(d.register_as(4000, ep("db", &["web"])).is_err());
    }

    #[test]
    fn re_registering_changes_the_key_so_old_secrets_stop_working() {
        let d = MemDirectory::default();
        let k1 = d.register_as(5, ep("db", &["app"])).unwrap();
        let s1 = d.resolve_as(0, "app", "db").unwrap().secret;
        assert_eq!(s1, k1.pair_secret("app"));
        let k2 = d.register_as(5, ep("db", &["app"])).unwrap();
        assert_ne!(k1, k2);
        assert_ne!(d.resolve_as(0, "app", "db").unwrap().secret, s1);
    }

    #[test]
    fn a_name_that_changes_hands_voids_the_secrets_its_former_holder_got() {
        let d = MemDirectory::default();
        let k = d.register_as(5, ep("db", &["app"])).unwrap();
        d.claim_as(7, "app").unwrap();
        let old = d.resolve_as(7, "app", "db").unwrap().secret;
        assert_eq!(old, k.pair_secret("app"));
        // Released, then taken by another uid: db's key changed, so the old
        // secret proves nothing; db learns its new key by asking.
        d.unregister_as(7, "app").unwrap();
        d.claim_as(8, "app").unwrap();
        let new_key = d.key_as(5, "db").unwrap();
        assert_ne!(new_key, k);
        assert_ne!(new_key.pair_secret("app"), old);
        assert_eq!(
            d.resolve_as(8, "app", "db").unwrap().secret,
            new_key.pair_secret("app")
        );
        // Reserving a held name for someone else does the same.
        d.reserve_as(0, "app", 9).unwrap();
        assert_ne!(d.key_as(5, "db").unwrap(), new_key);
        // Only db's owner (or root) reads db's key.
        assert!(d.key_as(9, "db").is_err());
    }

    #[test]
    fn a_withdrawn_endpoint_keeps_its_name() {
        let d = MemDirectory::default();
        d.register_as(5, ep("db", &["app"])).unwrap();
        d.withdraw_as(5, "db").unwrap();
        assert!(matches!(
            d.resolve_as(0, "app", "db"),
            Err(IcError::UnknownEndpoint(_))
        ));
        assert!(d.claim_as(6, "db").is_err());
        assert!(d.withdraw_as(6, "db").is_err());
        d.register_as(5, ep("db", &["app"])).unwrap();
    }

    #[test]
    fn a_reserve_that_cannot_fit_leaves_the_name_where_it_was() {
        let d = MemDirectory::default();
        for i in 0..MAX_NAMES_PER_UID {
            d.claim_as(7, &format!("n{i}")).unwrap();
        }
        d.claim_as(8, "web").unwrap();
        assert!(d.reserve_as(0, "web", 7).is_err());
        assert!(d.claim_as(9, "web").is_err(), "the name was freed");
        d.claim_as(8, "web").unwrap();
    }

    #[test]
    fn one_uid_cannot_fill_the_directory_with_long_allowlists() {
        let d = MemDirectory::default();
        let long: Vec<String> = (0..MAX_ALLOW).map(|i| format!("{i:0>190}")).collect();
        let refs: Vec<&str> = long.iter().map(String::as_str).collect();
        let mut registered = 0;
        let e = loop {
            match d.register_as(7, ep(&format!("svc{registered}"), &refs)) {
                Ok(_) => registered += 1,
                Err(e) => break e,
            }
        };
        assert!(e.to_string().contains("more than 1048576"), "{e}");
        assert!(registered > 0 && registered < 30, "{registered}");
        // Withdrawing gives the bytes back; other uids are not affected.
        d.register_as(8, ep("other", &refs)).unwrap();
        d.withdraw_as(7, "svc0").unwrap();
        d.register_as(7, ep("svc0", &refs)).unwrap();
    }

    #[test]
    fn oversized_endpoints_are_refused() {
        let d = MemDirectory::default();
        let many: Vec<String> = (0..=MAX_ALLOW).map(|i| format!("a{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(d.register_as(1, ep("db", &refs)).is_err());
        let mut long = ep("db", &["app"]);
        long.host_id = "h".repeat(MAX_HOST_ID + 1);
        assert!(d.register_as(1, long).is_err());
        assert!(d.register_as(1, ep("db", &["a/b"])).is_err());
    }

    #[test]
    fn one_uid_cannot_exhaust_the_names() {
        let d = MemDirectory::default();
        for i in 0..MAX_NAMES_PER_UID {
            d.claim_as(7, &format!("n{i}")).unwrap();
        }
        let e = d.claim_as(7, "one-more").unwrap_err();
        assert!(e.to_string().contains("holds 1024 names"), "{e}");
        d.claim_as(8, "one-more").unwrap();
        d.unregister_as(7, "n0").unwrap();
        d.claim_as(7, "one-more-now").unwrap();
    }

    #[test]
    fn bad_names_are_refused() {
        let d = MemDirectory::default();
        for bad in ["", "a/b", "nul\0", &"x".repeat(201)] {
            assert!(
                matches!(d.claim_as(1, bad), Err(IcError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }
}
