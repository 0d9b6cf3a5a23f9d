//! The control channel as part-vmm serves it. The protocol itself (request
//! and reply types, the exit record and how it is written) lives in
//! `channels::control`, the one home of the partd <-> monitor protocol; this
//! module adds what only the monitor knows: how an [`ExitReason`] becomes an
//! exit record.

pub use channels::control::{parse, write_exit_file, ExitRecord, Reply, Request};

use crate::exit::ExitReason;

/// The exit record of this process for `reason`.
pub fn exit_record(reason: &ExitReason) -> ExitRecord {
    ExitRecord {
        pid: std::process::id(),
        reason: reason.name().to_string(),
        status: reason.status(),
        detail: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_record_carries_the_reason_name_status_and_detail() {
        let r = exit_record(&ExitReason::TripleFault { vcpu: 1 });
        assert_eq!((r.reason.as_str(), r.status), ("triple-fault", 72));
        assert_eq!(r.pid, std::process::id());
        assert!(r.detail.contains("vcpu=1"), "{}", r.detail);
    }
}
