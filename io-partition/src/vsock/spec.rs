//! The `--port socket=PATH,cid=N[,accept=CID:PORT+...]` argument of
//! `part-io vsock`, and the static directory the ports make.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;

use partvisor_api::descriptor::{CID_ANY, MIN_GUEST_CID};

use super::packet::Addr;
use super::table::{Directory, Lookup, Refusal};
use crate::spec::{Grammar, Key, SpecError};

/// Errors in `part-io vsock` arguments.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("port `{spec}`: {source}")]
    Spec { spec: String, source: SpecError },
    #[error("port `{spec}`: cid `{cid}` is not a guest CID (a number from {MIN_GUEST_CID}, not {CID_ANY})")]
    Cid { spec: String, cid: String },
    #[error("port `{spec}`: accept entry `{entry}` is not CID:PORT (e.g. 4:5432)")]
    Accept { spec: String, entry: String },
    #[error("CID {0} is given to two ports; every partition has its own")]
    DuplicateCid(u32),
    #[error("socket {0} is used by two ports")]
    DuplicateSocket(PathBuf),
}

static GRAMMAR: Grammar = Grammar {
    keys: &[
        Key::value("socket", "PATH"),
        Key::value("cid", "N"),
        Key::maybe_empty("accept", "CID:PORT+CID:PORT"),
    ],
    usage: "socket=PATH,cid=N[,accept=CID:PORT+...]",
};

/// A parsed `--port` argument: one partition's vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// vhost-user socket part-io listens on.
    pub socket: PathBuf,
    /// The partition's CID (its config space, and the only source it may
    /// send from).
    pub cid: u32,
    /// Who may connect to this partition: (peer CID, port here).
    pub accept: Vec<(u32, u32)>,
}

fn guest_cid(text: &str) -> Option<u32> {
    text.parse::<u32>()
        .ok()
        .filter(|c| *c >= MIN_GUEST_CID && *c != CID_ANY)
}

impl FromStr for PortSpec {
    type Err = VsockError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let wrap = |source| VsockError::Spec {
            spec: spec.to_string(),
            source,
        };
        let items = crate::spec::parse(spec, &GRAMMAR).map_err(wrap)?;
        let cid_text = items.required("cid").map_err(wrap)?;
        let cid = guest_cid(cid_text).ok_or_else(|| VsockError::Cid {
            spec: spec.to_string(),
            cid: cid_text.to_string(),
        })?;
        let mut accept = Vec::new();
        for entry in items.value("accept").unwrap_or("").split('+') {
            if entry.is_empty() {
                continue;
            }
            let parsed = entry
                .split_once(':')
                .and_then(|(c, p)| Some((guest_cid(c)?, p.parse::<u32>().ok()?)));
            let Some(pair) = parsed.filter(|(_, p)| *p != u32::MAX) else {
                return Err(VsockError::Accept {
                    spec: spec.to_string(),
                    entry: entry.to_string(),
                });
            };
            accept.push(pair);
        }
        Ok(PortSpec {
            socket: items.required("socket").map_err(wrap)?.into(),
            cid,
            accept,
        })
    }
}

/// The directory of a `part-io vsock` started with fixed ports: every
/// partition is local, and each port's `accept` list is its policy.
#[derive(Debug)]
pub struct StaticDirectory {
    accept: HashMap<u32, HashSet<(u32, u32)>>,
}

impl StaticDirectory {
    /// The directory of `ports`; refuses two ports with one CID or socket.
    pub fn new(ports: &[PortSpec]) -> Result<StaticDirectory, VsockError> {
        let mut accept = HashMap::new();
        let mut sockets = HashSet::new();
        for p in ports {
            if accept
                .insert(p.cid, p.accept.iter().copied().collect())
                .is_some()
            {
                return Err(VsockError::DuplicateCid(p.cid));
            }
            if !sockets.insert(&p.socket) {
                return Err(VsockError::DuplicateSocket(p.socket.clone()));
            }
        }
        Ok(StaticDirectory { accept })
    }
}

impl Directory for StaticDirectory {
    fn lookup(&self, from_cid: u64, to: Addr) -> Lookup {
        let (Ok(from), Ok(cid)) = (u32::try_from(from_cid), u32::try_from(to.cid)) else {
            return Lookup::Refused(Refusal::UnknownCid);
        };
        match self.accept.get(&cid) {
            None => Lookup::Refused(Refusal::UnknownCid),
            Some(a) if a.contains(&(from, to.port)) => Lookup::Local,
            Some(_) => Lookup::Refused(Refusal::NotAccepted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_and_bad_ones_name_the_problem() {
        let p: PortSpec = "socket=/run/v3.sock,cid=3,accept=4:80+5:443"
            .parse()
            .unwrap();
        assert_eq!(
            p,
            PortSpec {
                socket: "/run/v3.sock".into(),
                cid: 3,
                accept: vec![(4, 80), (5, 443)]
            }
        );
        let bare: PortSpec = "socket=/s,cid=7".parse().unwrap();
        assert!(bare.accept.is_empty(), "default deny");
        let e = |s: &str| s.parse::<PortSpec>().unwrap_err().to_string();
        assert_eq!(
            e("socket=/s,cid=2"),
            "port `socket=/s,cid=2`: cid `2` is not a guest CID (a number from 3, not 4294967295)"
        );
        assert!(e("socket=/s,cid=x").contains("cid `x` is not a guest CID"));
        assert!(e("socket=/s").contains("missing `cid=N`"));
        assert!(e("socket=/s,cid=3,accept=4").contains("accept entry `4` is not CID:PORT"));
        assert!(e("socket=/s,cid=3,accept=1:80").contains("accept entry `1:80`"));
        assert!(e("socket=/s,cid=3,accept=4:4294967295").contains("accept entry"));
        assert!(e("socket=/s,cid=3,groups=a").contains("unknown key `groups`"));
    }

    #[test]
    fn the_static_directory_accepts_only_listed_peers_and_ports() {
        let ports: Vec<PortSpec> = ["socket=/a,cid=3,accept=4:80", "socket=/b,cid=4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let d = StaticDirectory::new(&ports).unwrap();
        let at = |cid, port| Addr { cid, port };
        assert_eq!(d.lookup(4, at(3, 80)), Lookup::Local);
        assert_eq!(
            d.lookup(4, at(3, 81)),
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
        assert!(matches!(
            StaticDirectory::new(&dup),
            Err(VsockError::DuplicateCid(3))
        ));
    }
}
