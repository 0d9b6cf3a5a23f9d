//! The relay's copy of partd's vsock directory: for every CID, the
//! partition holding it, where it lives and whom it accepts on which ports.
//!
//! partd writes it (over the control socket, [`super::control`]) before an
//! entry matters; `part-io vsock --port` started by hand fills it from its
//! arguments instead, naming each partition by its CID. Policy is by name:
//! a listener's entry lists the partitions that may connect, so a CID that
//! changes hands never inherits its old owner's rights.

use std::collections::HashMap;

use partvisor_api::definition::VsockAccept;
use partvisor_api::vsock::{Entry, Location};

use super::packet::Addr;
use super::spec::{PortSpec, VsockError};
use super::table::{Directory, Lookup, Refusal};

/// Every entry, by CID.
#[derive(Debug, Default)]
pub struct Entries {
    by_cid: HashMap<u32, Entry>,
}

impl Entries {
    /// The directory of ports given on the command line: every partition is
    /// local, named by its CID, and accepts what its `accept=` lists.
    pub fn from_ports(ports: &[PortSpec]) -> Result<Entries, VsockError> {
        let mut d = Entries::default();
        for p in ports {
            let mut accept: Vec<VsockAccept> = Vec::new();
            for (from, port) in &p.accept {
                let from = from.to_string();
                match accept.iter_mut().find(|a| a.from == from) {
                    Some(a) => a.ports.push(*port),
                    None => accept.push(VsockAccept {
                        from,
                        ports: vec![*port],
                    }),
                }
            }
            d.check(p.cid, &p.cid.to_string(), Some(&p.socket))?;
            d.by_cid.insert(
                p.cid,
                Entry {
                    cid: p.cid,
                    partition: p.cid.to_string(),
                    socket: Some(p.socket.clone()),
                    host_socket: p.host_socket.clone(),
                    location: Location::Local,
                    memory_mib: p.memory_limit.map(|b| b >> 20),
                    frontend_uid: p.frontend_uid,
                    accept,
                },
            );
        }
        Ok(d)
    }

    /// Whether `cid` may be given to `partition` with `socket`: no other
    /// partition holds the CID and no other CID uses the socket. `Ok(true)`
    /// when the entry is already there (an update of its policy).
    pub fn check(
        &self,
        cid: u32,
        partition: &str,
        socket: Option<&std::path::Path>,
    ) -> Result<bool, VsockError> {
        if let Some(e) = self.by_cid.get(&cid) {
            if e.partition == partition && e.socket.as_deref() == socket {
                return Ok(true);
            }
            return Err(VsockError::CidHeld {
                cid,
                partition: e.partition.clone(),
            });
        }
        if let Some(s) = socket {
            if self.by_cid.values().any(|e| e.socket.as_deref() == Some(s)) {
                return Err(VsockError::DuplicateSocket(s.to_owned()));
            }
        }
        Ok(false)
    }

    /// Adds or replaces `entry` (after [`Entries::check`]).
    pub fn insert(&mut self, entry: Entry) {
        self.by_cid.insert(entry.cid, entry);
    }

    /// Takes `cid`'s entry out.
    pub fn remove(&mut self, cid: u32) -> Option<Entry> {
        self.by_cid.remove(&cid)
    }

    /// `cid`'s entry.
    pub fn get(&self, cid: u32) -> Option<&Entry> {
        self.by_cid.get(&cid)
    }
}

impl Directory for Entries {
    fn lookup(&self, from_cid: u64, to: Addr) -> Lookup {
        let entry = |cid: u64| u32::try_from(cid).ok().and_then(|c| self.by_cid.get(&c));
        let (Some(from), Some(listener)) = (entry(from_cid), entry(to.cid)) else {
            return Lookup::Refused(Refusal::UnknownCid);
        };
        if let Location::Remote { .. } = listener.location {
            return Lookup::Refused(Refusal::Remote);
        }
        let accepted = listener
            .accept
            .iter()
            .any(|a| a.from == from.partition && a.ports.contains(&to.port));
        if accepted {
            Lookup::Local
        } else {
            Lookup::Refused(Refusal::NotAccepted)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cid: u32, name: &str, accept: &[(&str, &[u32])]) -> Entry {
        Entry {
            cid,
            partition: name.into(),
            socket: Some(format!("/s/{name}.sock").into()),
            host_socket: None,
            location: Location::Local,
            memory_mib: None,
            frontend_uid: None,
            accept: accept
                .iter()
                .map(|(f, p)| VsockAccept {
                    from: (*f).into(),
                    ports: p.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_static_directory_accepts_only_listed_peers_and_ports() {
        let ports: Vec<PortSpec> = ["socket=/a,cid=3,accept=4:80+4:81", "socket=/b,cid=4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let d = Entries::from_ports(&ports).unwrap();
        let at = |cid, port| Addr { cid, port };
        assert_eq!(d.lookup(4, at(3, 80)), Lookup::Local);
        assert_eq!(d.lookup(4, at(3, 81)), Lookup::Local);
        assert_eq!(
            d.lookup(4, at(3, 82)),
            Lookup::Refused(Refusal::NotAccepted)
        );
        assert_eq!(
            d.lookup(3, at(4, 80)),
            Lookup::Refused(Refusal::NotAccepted)
        );
        assert_eq!(d.lookup(3, at(9, 80)), Lookup::Refused(Refusal::UnknownCid));
        assert_eq!(
            d.lookup(3, at(1 << 40, 80)),
            Lookup::Refused(Refusal::UnknownCid)
        );
        let dup: Vec<PortSpec> = ["socket=/a,cid=3", "socket=/b,cid=3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            Entries::from_ports(&dup).unwrap_err().to_string(),
            "CID 3 is held by partition 3; every partition has its own"
        );
        let same_socket: Vec<PortSpec> = ["socket=/a,cid=3", "socket=/a,cid=4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(matches!(
            Entries::from_ports(&same_socket),
            Err(VsockError::DuplicateSocket(_))
        ));
    }

    #[test]
    fn policy_is_by_partition_name_so_a_reused_cid_inherits_nothing() {
        let mut d = Entries::default();
        d.insert(entry(3, "db", &[("web", &[5432])]));
        d.insert(entry(4, "web", &[]));
        let db = Addr { cid: 3, port: 5432 };
        assert_eq!(d.lookup(4, db), Lookup::Local);
        // web stops; CID 4 goes to another partition.
        d.remove(4);
        assert_eq!(d.lookup(4, db), Lookup::Refused(Refusal::UnknownCid));
        d.insert(entry(4, "intruder", &[]));
        assert_eq!(d.lookup(4, db), Lookup::Refused(Refusal::NotAccepted));
    }

    #[test]
    fn a_remote_listener_is_refused_as_remote_until_hosts_are_joined() {
        let mut d = Entries::default();
        d.insert(entry(4, "web", &[]));
        let mut far = entry(9, "far", &[("web", &[1])]);
        far.socket = None;
        far.location = Location::Remote { host: "h2".into() };
        d.insert(far);
        assert_eq!(
            d.lookup(4, Addr { cid: 9, port: 1 }),
            Lookup::Refused(Refusal::Remote)
        );
    }

    #[test]
    fn an_entry_is_replaced_only_by_its_own_partition_and_socket() {
        let mut d = Entries::default();
        d.insert(entry(3, "db", &[]));
        let s = std::path::Path::new("/s/db.sock");
        assert!(d.check(3, "db", Some(s)).unwrap(), "same entry: an update");
        assert_eq!(
            d.check(3, "web", Some(std::path::Path::new("/s/web.sock")))
                .unwrap_err()
                .to_string(),
            "CID 3 is held by partition db; every partition has its own"
        );
        assert!(matches!(
            d.check(5, "web", Some(s)),
            Err(VsockError::DuplicateSocket(_))
        ));
        assert!(!d.check(5, "web", None).unwrap());
    }
}
