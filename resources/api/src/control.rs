//! The control channel between partd and the monitors it supervises: the
//! control socket a supervisor uses to watch and stop a partition, and the
//! exit record that outlives the monitor process. `part-vmm` serves it
//! (`part_vmm::control`, which also writes the exit file), `partd` speaks it.
//!
//! Protocol: newline-delimited JSON over a Unix stream socket, one reply
//! line per request line.
//!
//! ```text
//! -> {"op":"ping"}
//! <- {"ok":true,"pid":1234,"state":"running","uptime_ms":5012}
//! -> {"op":"stop","force":false}
//! <- {"ok":true,"pid":1234,"state":"stopping","uptime_ms":5020}
//! -> {"op":"reboot"}
//! <- {"ok":false,"error":"unknown variant `reboot`, expected `ping` or `stop` at line 1 column 15"}
//! ```
//!
//! A monitor that does not answer a ping (stopped, hung) is the
//! supervisor's cue to mark the partition unresponsive.

use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Liveness and state.
    Ping,
    /// Polite stop (ACPI power button, forced after the timeout), or an
    /// immediate forced stop.
    Stop {
        #[serde(default)]
        force: bool,
    },
}

/// The reply to every request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `running` or `stopping`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What part-vmm records about its end, for a supervisor that was not
/// watching (e.g. restarted meanwhile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub pid: u32,
    pub reason: String,
    pub status: i32,
    pub detail: String,
}

/// Parses one request line into a request or the reply that rejects it.
pub fn parse(line: &str) -> std::result::Result<Request, Reply> {
    serde_json::from_str(line).map_err(|e| Reply {
        ok: false,
        error: Some(e.to_string()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_get_an_error_reply() {
        assert_eq!(parse(r#"{"op":"ping"}"#), Ok(Request::Ping));
        assert_eq!(
            parse(r#"{"op":"stop"}"#),
            Ok(Request::Stop { force: false })
        );
        assert_eq!(
            parse(r#"{"op":"stop","force":true}"#),
            Ok(Request::Stop { force: true })
        );
        let bad = parse(r#"{"op":"reboot"}"#).unwrap_err();
        assert!(!bad.ok);
        assert!(bad.error.unwrap().contains("unknown variant `reboot`"));
        assert!(parse("not json").is_err());
    }
}
