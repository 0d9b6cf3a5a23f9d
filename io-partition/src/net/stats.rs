//! Counters of the switch: per port ([`PortStats`]) and of the uplink, the
//! one-line summary logged at every disconnect, and the stats socket that
//! answers every connection with all of them as one JSON line.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use partvisor_runtime::sync::MutexExt;
use serde::Serialize;

use super::{MacAddr, Switch};
use crate::chain::Malformed;
use crate::server::ListenError;

/// Counters of one port. "tx" is what the guest sent (its transmit queue),
/// "rx" what was delivered to it (its receive queue).
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames the guest sent that the switch accepted.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (Ethernet frame, without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Frames delivered into the guest's receive queue.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames.
    pub rx_bytes: AtomicU64,
    /// Frames for this guest dropped because no receive buffer was posted.
    pub dropped_full: AtomicU64,
    /// Unicast frames for this port dropped because no frontend was attached
    /// (or its receive queue was not enabled).
    pub dropped_down: AtomicU64,
    /// Frames the guest sent from a source MAC other than the port's.
    pub dropped_spoof: AtomicU64,
    /// Frames the guest sent that were shorter than an Ethernet header,
    /// longer than 1514 bytes, or had a non-zero virtio-net header
    /// (offloads were not offered).
    pub tx_bad_frame: AtomicU64,
    /// Receive buffers too small for the frame (or not device-writable),
    /// returned with length 0; the frame is dropped.
    pub rx_bad_buffer: AtomicU64,
    /// Malformed chains, per [`Malformed`] kind (either queue).
    pub malformed: [AtomicU64; Malformed::ALL.len()],
    /// Connections refused because a memory region failed the seal check.
    pub refused_regions: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

/// Reads a counter.
pub(super) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Adds one to a counter; returns the new value.
pub(super) fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

impl PortStats {
    /// Counts one malformed chain of `kind`; returns the new count of that kind.
    pub(super) fn count_malformed(&self, kind: Malformed) -> u64 {
        bump(&self.malformed[kind.index()])
    }

    /// One line with every counter of the port with `mac`, for logs.
    pub(super) fn summary(&self, mac: MacAddr) -> String {
        let c = self.snapshot();
        let mut s = format!(
            "mac={} tx_frames={} tx_bytes={} rx_frames={} rx_bytes={} dropped_full={} dropped_down={} dropped_spoof={} tx_bad_frame={} rx_bad_buffer={} refused_regions={} connections={}",
            mac, c.tx_frames, c.tx_bytes, c.rx_frames, c.rx_bytes, c.dropped_full,
            c.dropped_down, c.dropped_spoof, c.tx_bad_frame, c.rx_bad_buffer, c.refused_regions,
            c.connections
        );
        for (k, v) in c.malformed {
            s.push_str(&format!(" malformed.{k}={v}"));
        }
        s
    }

    /// A point-in-time copy of every counter.
    pub fn snapshot(&self) -> PortCounters {
        PortCounters {
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            dropped_full: get(&self.dropped_full),
            dropped_down: get(&self.dropped_down),
            dropped_spoof: get(&self.dropped_spoof),
            tx_bad_frame: get(&self.tx_bad_frame),
            rx_bad_buffer: get(&self.rx_bad_buffer),
            malformed: Malformed::ALL
                .iter()
                .map(|k| (k.name(), get(&self.malformed[k.index()])))
                .collect(),
            refused_regions: get(&self.refused_regions),
            connections: get(&self.connections),
        }
    }
}

/// A point-in-time copy of [`PortStats`] (the stats socket's per-port object).
#[derive(Debug, Serialize)]
pub struct PortCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub dropped_full: u64,
    pub dropped_down: u64,
    pub dropped_spoof: u64,
    pub tx_bad_frame: u64,
    pub rx_bad_buffer: u64,
    pub malformed: std::collections::BTreeMap<&'static str, u64>,
    pub refused_regions: u64,
    pub connections: u64,
}

/// Counters of the uplink. "rx" is what the host side sent into the
/// switch, "tx" what the switch wrote to the tap.
#[derive(Debug, Default, Serialize)]
pub struct UplinkCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub dropped_full: u64,
    pub dropped_spoof: u64,
    pub dropped_bad_frame: u64,
    pub errors: u64,
}

/// The uplink's live counters (see [`UplinkCounters`]).
#[derive(Debug, Default)]
pub(super) struct UplinkStats {
    pub(super) rx_frames: AtomicU64,
    pub(super) tx_frames: AtomicU64,
    pub(super) dropped_full: AtomicU64,
    pub(super) dropped_spoof: AtomicU64,
    pub(super) dropped_bad_frame: AtomicU64,
    pub(super) errors: AtomicU64,
}

impl UplinkStats {
    fn snapshot(&self) -> UplinkCounters {
        UplinkCounters {
            rx_frames: get(&self.rx_frames),
            tx_frames: get(&self.tx_frames),
            dropped_full: get(&self.dropped_full),
            dropped_spoof: get(&self.dropped_spoof),
            dropped_bad_frame: get(&self.dropped_bad_frame),
            errors: get(&self.errors),
        }
    }
}

impl Switch {
    /// Counters of every port and the uplink, as one JSON line (the answer
    /// of the stats socket).
    pub fn stats_json(&self) -> String {
        #[derive(Serialize)]
        struct PortJson<'a> {
            socket: &'a Path,
            mac: MacAddr,
            connected: bool,
            rx_ready: bool,
            #[serde(flatten)]
            counters: PortCounters,
        }
        #[derive(Serialize)]
        struct UplinkJson<'a> {
            ifname: &'a str,
            #[serde(flatten)]
            counters: UplinkCounters,
        }
        #[derive(Serialize)]
        struct SwitchJson<'a> {
            ports: Vec<PortJson<'a>>,
            uplink: Option<UplinkJson<'a>>,
            learned: usize,
        }
        let doc = SwitchJson {
            ports: self
                .ports
                .iter()
                .map(|p| PortJson {
                    socket: &p.spec.socket,
                    mac: p.spec.mac,
                    connected: p.connected.load(Ordering::Relaxed),
                    rx_ready: p.rx_ready(),
                    counters: p.stats.snapshot(),
                })
                .collect(),
            uplink: self.uplink.as_ref().map(|u| UplinkJson {
                ifname: u.tap.name(),
                counters: u.stats.snapshot(),
            }),
            learned: self.learned.locked().len(),
        };
        // Serializing plain structs of numbers and strings cannot fail.
        serde_json::to_string(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Listens on the stats socket `path`, replacing a stale socket there (any
/// other file there is an error).
pub fn bind_stats(path: &Path) -> Result<UnixListener, ListenError> {
    crate::server::listen("stats socket", path)
}

/// Serves `switch.stats_json()` on `listener`: one JSON line per connection,
/// forever.
pub fn serve_stats(switch: &Switch, listener: UnixListener) {
    crate::server::serve_lines(listener, || switch.stats_json());
}
