//! The `--port socket=PATH,cid=N[,uds=PATH][,accept=CID:PORT+...]`
//! argument of `part-io vsock` (ports fixed at start; partd adds them over
//! the control socket instead), and the errors of vsock ports.

use std::path::PathBuf;
use std::str::FromStr;

use partvisor_api::descriptor::{CID_ANY, MIN_GUEST_CID};

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
    #[error("CID {cid} is held by partition {partition}; every partition has its own")]
    CidHeld { cid: u32, partition: String },
    #[error("socket {0} is used by two ports")]
    DuplicateSocket(PathBuf),
    #[error("entry for CID {cid}: {why}")]
    BadEntry { cid: u32, why: &'static str },
    #[error("host socket path {0} is too long: with a port suffix (`_4294967295`) it must fit a Unix socket address ({max} bytes)", max = super::hybrid::MAX_PATH)]
    HostSocketTooLong(PathBuf),
}

static GRAMMAR: Grammar = Grammar {
    keys: &[
        Key::value("socket", "PATH"),
        Key::value("cid", "N"),
        Key::value("uds", "PATH"),
        Key::maybe_empty("accept", "CID:PORT+CID:PORT"),
        Key::value("memory", "MIB"),
        Key::value("frontend-uid", "UID"),
    ],
    usage: "socket=PATH,cid=N[,uds=PATH][,accept=CID:PORT+...][,memory=MIB][,frontend-uid=UID]",
};

/// A parsed `--port` argument: one partition's vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// vhost-user socket part-io listens on.
    pub socket: PathBuf,
    /// The partition's CID (its config space, and the only source it may
    /// send from).
    pub cid: u32,
    /// The hybrid host socket (Firecracker's `uds_path`), if any.
    pub host_socket: Option<PathBuf>,
    /// Who may connect to this partition: (peer CID, port here).
    pub accept: Vec<(u32, u32)>,
    /// The partition's granted memory in bytes (`memory=MIB`): a frontend
    /// whose memory table maps more is refused.
    pub memory_limit: Option<u64>,
    /// The only uid whose frontend may connect (`frontend-uid=UID`).
    pub frontend_uid: Option<u32>,
}

/// `text` as a guest CID (from [`MIN_GUEST_CID`], not [`CID_ANY`]).
pub fn guest_cid(text: &str) -> Option<u32> {
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
            host_socket: items.value("uds").map(PathBuf::from),
            accept,
            memory_limit: items.memory_limit().map_err(wrap)?,
            frontend_uid: items.frontend_uid().map_err(wrap)?,
        })
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
                host_socket: None,
                accept: vec![(4, 80), (5, 443)],
                memory_limit: None,
                frontend_uid: None,
            }
        );
        let bare: PortSpec = "socket=/s,cid=7".parse().unwrap();
        assert!(bare.accept.is_empty(), "default deny");
        let hybrid: PortSpec = "socket=/s,cid=7,uds=/h/v.sock".parse().unwrap();
        assert_eq!(hybrid.host_socket, Some("/h/v.sock".into()));
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
}
