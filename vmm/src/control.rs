//! The control channel as part-vmm serves it. The protocol itself (request
//! and reply types, the exit record) lives in `partvisor_api::control`, the
//! one home of the partd <-> monitor protocol; this module adds what only
//! the monitor does: turning an [`ExitReason`] into an exit record and
//! writing it to the exit file.

use std::io::Write;
use std::path::Path;

pub use partvisor_api::control::{parse, ExitRecord, Reply, Request};

use crate::exit::ExitReason;

/// Writes `record` to `path` atomically (temporary file, fsync, rename), so
/// a reader sees the whole record or none.
pub fn write_exit_file(path: &Path, record: &ExitRecord) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, record)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

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

    #[test]
    fn exit_file_is_written_whole() {
        let dir = std::env::temp_dir().join(format!("pv-ch-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("exit.json");
        let rec = ExitRecord {
            pid: 7,
            reason: "triple-fault".into(),
            status: 72,
            detail: "reason=triple-fault status=72 vcpu=1".into(),
        };
        write_exit_file(&p, &rec).unwrap();
        let r: ExitRecord = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(r, rec);
        assert!(!p.with_extension("tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
