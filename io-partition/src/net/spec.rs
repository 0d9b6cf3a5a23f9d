//! The `--port socket=PATH,mac=XX:XX:XX:XX:XX:XX` argument.

use std::path::PathBuf;
use std::str::FromStr;

use super::MacAddr;
use crate::spec::{Grammar, Key, SpecError};

/// Errors in `part-io net` arguments.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("port `{spec}`: {source}")]
    Spec { spec: String, source: SpecError },
    #[error(transparent)]
    Mac(#[from] partvisor_api::ParseError),
    #[error(
        "port MAC {0} is a multicast/broadcast or all-zero address; a port needs a unicast MAC"
    )]
    GroupMac(MacAddr),
    #[error("MAC {0} is given to two ports; every port needs its own")]
    DuplicateMac(MacAddr),
    #[error("socket {0} is used by two ports")]
    DuplicateSocket(PathBuf),
}

/// The keys of a `--port` spec.
static GRAMMAR: Grammar = Grammar {
    keys: &[
        Key::value("socket", "PATH"),
        Key::value("mac", "XX:XX:XX:XX:XX:XX"),
        Key::value("memory", "MIB"),
        Key::value("frontend-uid", "UID"),
    ],
    usage: "socket=PATH,mac=XX:XX:XX:XX:XX:XX[,memory=MIB][,frontend-uid=UID]",
};

/// A parsed `--port` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// vhost-user socket part-io listens on.
    pub socket: PathBuf,
    /// The only source MAC this port may send from; also its config-space MAC.
    pub mac: MacAddr,
    /// The partition's granted memory in bytes (`memory=MIB`): a frontend
    /// whose memory table maps more is refused.
    pub memory_limit: Option<u64>,
    /// The only uid whose frontend may connect (`frontend-uid=UID`).
    pub frontend_uid: Option<u32>,
}

impl FromStr for PortSpec {
    type Err = NetError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let wrap = |source| NetError::Spec {
            spec: spec.to_string(),
            source,
        };
        let items = crate::spec::parse(spec, &GRAMMAR).map_err(wrap)?;
        let mac: MacAddr = items.required("mac").map_err(wrap)?.parse()?;
        if mac.is_multicast() || mac.0 == [0; 6] {
            return Err(NetError::GroupMac(mac));
        }
        Ok(PortSpec {
            socket: items.required("socket").map_err(wrap)?.into(),
            mac,
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
        let p: PortSpec = "socket=/run/a.sock,mac=02:00:00:00:00:0a".parse().unwrap();
        assert_eq!(p.socket, PathBuf::from("/run/a.sock"));
        assert_eq!(p.mac, MacAddr([2, 0, 0, 0, 0, 0x0a]));
        assert_eq!(p.mac.to_string(), "02:00:00:00:00:0a");
        let e = |s: &str| s.parse::<PortSpec>().unwrap_err().to_string();
        assert!(e("mac=02:00:00:00:00:01").contains("missing `socket=PATH`"));
        assert!(e("socket=a").contains("missing `mac="));
        assert!(e("socket=a,mac=02:00:00:00:00").contains("not a MAC address"));
        assert!(e("socket=a,mac=02:00:00:00:00:01:03").contains("not a MAC address"));
        assert!(e("socket=a,mac=0g:00:00:00:00:01").contains("not a MAC address"));
        assert!(e("socket=a,mac=ff:ff:ff:ff:ff:ff").contains("needs a unicast MAC"));
        assert!(e("socket=a,mac=01:00:5e:00:00:01").contains("needs a unicast MAC"));
        assert!(e("socket=a,mac=00:00:00:00:00:00").contains("needs a unicast MAC"));
        assert!(e("socket=a,mac=02:00:00:00:00:01,vlan=3").contains("unknown key `vlan`"));
        assert!(e("socket=a,socket=b,mac=02:00:00:00:00:01").contains("`socket` given twice"));
    }

    #[test]
    fn port_spec_errors_name_the_port_and_the_key() {
        let e = |s: &str| s.parse::<PortSpec>().unwrap_err().to_string();
        assert_eq!(
            e("socket=a,mac=02:00:00:00:00:01,vlan=3"),
            "port `socket=a,mac=02:00:00:00:00:01,vlan=3`: unknown key `vlan` (known: socket, mac, memory, frontend-uid)"
        );
        assert_eq!(
            e("socket,mac=02:00:00:00:00:01"),
            "port `socket,mac=02:00:00:00:00:01`: `socket` needs a value (`socket=PATH`); \
             expected key=value pairs `socket=PATH,mac=XX:XX:XX:XX:XX:XX[,memory=MIB][,frontend-uid=UID]`"
        );
        assert_eq!(
            e("socket=a"),
            "port `socket=a`: missing `mac=XX:XX:XX:XX:XX:XX`"
        );
    }
}
