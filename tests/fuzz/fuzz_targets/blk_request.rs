//! virtio-blk requests as a guest queues them, executed by part-io's blk
//! device against a real (small) image: every chain is answered with a
//! status or refused as malformed, nothing is read or written outside the
//! image or the chain's buffers, and nothing panics.
//!
//! Input: the queue's descriptor table, available ring and buffers
//! (`vring.rs`).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use part_io::blk::BlkDevice;
use part_io::device::DeviceModel;
use part_io::export::{Export, ExportSpec};

#[path = "vring.rs"]
mod vring;

/// One image for the whole run (a request may write to it; its size never
/// changes).
fn export() -> Option<Arc<Export>> {
    static EXPORT: OnceLock<Option<(tempfile::TempDir, Arc<Export>)>> = OnceLock::new();
    EXPORT
        .get_or_init(|| {
            let dir = tempfile::tempdir().ok()?;
            let image = dir.path().join("disk.img");
            std::fs::File::create(&image).ok()?.set_len(64 << 10).ok()?;
            let spec = ExportSpec {
                socket: dir.path().join("disk.sock"),
                image,
                readonly: false,
                id: Some("fuzz".into()),
                memory_limit: None,
                frontend_uid: None,
            };
            let export = Arc::new(Export::open(spec).ok()?);
            Some((dir, export))
        })
        .as_ref()
        .map(|(_, e)| e.clone())
}

fuzz_target!(|data: &[u8]| {
    let Some(export) = export() else {
        return;
    };
    let Some(mem) = vring::guest(data) else {
        return;
    };
    let Some(q) = vring::queue(&mem) else {
        return;
    };
    let mut dev = BlkDevice::new(export);
    dev.update_memory(mem);
    let _ = dev.process_queue(0, &q);
});
