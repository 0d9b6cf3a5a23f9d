//! Per-partition counters of `part-io vsock`: what it relayed, and each
//! kind of misbehaviour it refused, so an operator can see who did what.

use std::sync::atomic::{AtomicU64, Ordering};

use super::packet::BadHeader;
use super::table::TableCounters;
use crate::chain::Malformed;

fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

/// Counters of one partition's vsock device.
#[derive(Debug, Default)]
pub struct VsockStats {
    pub connections: AtomicU64,
    pub refused_regions: AtomicU64,
    /// Packets taken off its tx queue and accepted.
    pub tx_packets: AtomicU64,
    /// Payload bytes it sent that were delivered.
    pub tx_bytes: AtomicU64,
    /// Packets put on its rx queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes put on its rx queue.
    pub rx_bytes: AtomicU64,
    /// Headers refused ([`BadHeader`]), all kinds together.
    pub bad_header: AtomicU64,
    /// Of which: a source CID that was not its own.
    pub spoofed: AtomicU64,
    /// tx buffers whose payload was shorter than the header's `len`, or
    /// that held a device-writable descriptor.
    pub bad_buffer: AtomicU64,
    /// rx buffers too small for a header, or not device-writable.
    pub bad_rx_buffer: AtomicU64,
    /// Malformed chains, per [`Malformed`] kind.
    pub malformed: [AtomicU64; Malformed::ALL.len()],
    /// Payload bytes waiting for its rx buffers now.
    pub queued_bytes: AtomicU64,
    /// Refusals and resets the table decided on its packets (for rate
    /// limiting their log lines; the kinds are in the table's counters).
    pub table_events: AtomicU64,
    /// Hybrid connections opened (either way).
    pub host_connections: AtomicU64,
    /// Hybrid connections refused: no host listener, the guest refused or
    /// did not answer, limits.
    pub host_refused: AtomicU64,
    /// Hybrid connections reset by part-io for the guest's misbehaviour.
    pub host_resets: AtomicU64,
    /// Packets not valid in a hybrid connection's state, and bad `CONNECT`
    /// lines from host processes.
    pub host_protocol_errors: AtomicU64,
    /// Hybrid connections the guest broke the credit rules on.
    pub host_credit_violations: AtomicU64,
    /// Bytes read from host processes and delivered to the guest.
    pub host_to_guest_bytes: AtomicU64,
    /// Bytes the guest sent that were written to host processes.
    pub guest_to_host_bytes: AtomicU64,
}

impl VsockStats {
    /// Counts a refused header; returns how many there were so far.
    pub fn count_bad_header(&self, e: &BadHeader) -> u64 {
        if matches!(e, BadHeader::Spoofed { .. }) {
            bump(&self.spoofed);
        }
        bump(&self.bad_header)
    }

    /// Counts a malformed chain; returns how many of its kind so far.
    pub fn count_malformed(&self, kind: Malformed) -> u64 {
        bump(&self.malformed[kind.index()])
    }

    pub(super) fn bump(c: &AtomicU64) -> u64 {
        bump(c)
    }

    /// Every counter by name, the table's included.
    pub fn counters(&self, table: &TableCounters) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut v = vec![
            ("connections", g(&self.connections)),
            ("tx_packets", g(&self.tx_packets)),
            ("tx_bytes", g(&self.tx_bytes)),
            ("rx_packets", g(&self.rx_packets)),
            ("rx_bytes", g(&self.rx_bytes)),
            ("queued_bytes", g(&self.queued_bytes)),
            ("open", table.open),
            ("lookups", table.lookups),
            ("refused", table.refused),
            ("credit_violations", table.credit_violations),
            ("protocol_errors", table.protocol_errors),
            ("no_connection", table.no_connection),
            ("bad_header", g(&self.bad_header)),
            ("spoofed", g(&self.spoofed)),
            ("bad_buffer", g(&self.bad_buffer)),
            ("bad_rx_buffer", g(&self.bad_rx_buffer)),
            ("refused_regions", g(&self.refused_regions)),
            ("host_connections", g(&self.host_connections)),
            ("host_refused", g(&self.host_refused)),
            ("host_resets", g(&self.host_resets)),
            ("host_protocol_errors", g(&self.host_protocol_errors)),
            ("host_credit_violations", g(&self.host_credit_violations)),
            ("host_to_guest_bytes", g(&self.host_to_guest_bytes)),
            ("guest_to_host_bytes", g(&self.guest_to_host_bytes)),
        ];
        for k in Malformed::ALL {
            v.push((k.name(), g(&self.malformed[k.index()])));
        }
        v
    }

    /// One line with every counter, for logs.
    pub fn summary(&self, table: &TableCounters) -> String {
        self.counters(table)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
