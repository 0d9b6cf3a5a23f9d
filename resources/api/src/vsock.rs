//! The vsock directory protocol between partd and `part-io vsock`.
//!
//! partd is the one writer of the directory: which partition holds which
//! CID, where it lives, and whom it accepts on which ports (its
//! definition's `[vsock]` allowlist). It pushes every entry to the host's
//! `part-io vsock` over that process's control socket before the entry
//! matters (an entry is added before the partition's monitor starts and
//! removed before its CID goes back to the resource map), and part-io
//! answers each connection request from that copy: one lookup per
//! connection, no round trip to partd on the data path, and a partd
//! restart does not stop guests from connecting.
//!
//! Protocol: newline-delimited JSON over a Unix stream socket, one reply
//! line per request line.
//!
//! ```text
//! -> {"op":"add","cid":3,"partition":"db","socket":"/s/db.sock","accept":[{"from":"web","ports":[5432]}]}
//! <- {"ok":true}
//! -> {"op":"remove","cid":3}
//! <- {"ok":true,"connected":false,"reset":2}
//! -> {"op":"stats"}
//! <- {"ok":true,"stats":{"ports":[...]}}
//! ```
//!
//! `add` of a CID that is already there with the same partition and
//! socket replaces its policy (idempotent); any other clash is an error.
//! `remove` takes the entry out, stops listening on its socket and resets
//! every connection the partition was an end of; `connected` says whether
//! its frontend is still attached (the CID may be granted again only once
//! it is not), `reset` how many connections were reset.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::definition::VsockAccept;

/// Where a partition with a CID lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Location {
    /// On this host, served by this part-io.
    #[default]
    Local,
    /// On another host (filled in by cluster mode).
    Remote { host: String },
}

/// One directory entry: a partition's CID, name, place and policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub cid: u32,
    pub partition: String,
    /// The vhost-user socket part-io serves the partition's device on
    /// (local partitions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Where hybrid host sockets are: a host process connects to this path
    /// and writes `CONNECT <port>`; a guest connecting to CID 2 port P
    /// reaches a listener at `<host_socket>_P` (local partitions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_socket: Option<PathBuf>,
    #[serde(default)]
    pub location: Location,
    /// The partition's granted memory in MiB: its frontend's memory table
    /// may map no more (local partitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The only uid whose frontend may connect to the partition's device
    /// socket: its monitor's (local partitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend_uid: Option<u32>,
    /// Who may connect to this partition, on which ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept: Vec<VsockAccept>,
}

/// A request on part-io vsock's control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Add(Entry),
    Remove { cid: u32 },
    Stats,
}

/// The reply to every request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// `remove`: whether the partition's frontend is still attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// `remove`: connections reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<u64>,
    /// `stats`: every port's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A failed request, with what went wrong.
    pub fn error(message: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(message.to_string()),
            ..Reply::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_json_form() {
        let add: Request = serde_json::from_str(
            r#"{"op":"add","cid":3,"partition":"db","socket":"/s/db.sock","accept":[{"from":"web","ports":[5432]}]}"#,
        )
        .unwrap();
        assert_eq!(
            add,
            Request::Add(Entry {
                cid: 3,
                partition: "db".into(),
                socket: Some("/s/db.sock".into()),
                host_socket: None,
                location: Location::Local,
                memory_mib: None,
                frontend_uid: None,
                accept: vec![VsockAccept {
                    from: "web".into(),
                    ports: vec![5432]
                }],
            })
        );
        let remote: Request = serde_json::from_str(
            r#"{"op":"add","cid":9,"partition":"far","location":{"kind":"remote","host":"h2"}}"#,
        )
        .unwrap();
        assert!(matches!(
            remote,
            Request::Add(Entry { location: Location::Remote { ref host }, .. }) if host == "h2"
        ));
        assert_eq!(
            serde_json::to_string(&Request::Remove { cid: 3 }).unwrap(),
            r#"{"op":"remove","cid":3}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"add","cid":3}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"remove","cid":3,"x":1}"#).is_err());
        let r = Reply::error("no such CID");
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":false,"error":"no such CID"}"#
        );
    }
}
