//! Block exports: `socket=PATH,image=PATH[,readonly][,id=SERIAL]`.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use crate::chain::Malformed;
use crate::spec::{Grammar, Key, SpecError};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Errors in an `--export` argument or while opening its image.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export `{spec}`: {source}")]
    Spec { spec: String, source: SpecError },
    #[error("export `{spec}`: id `{id}` is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    IdTooLong { spec: String, id: String },
    #[error("cannot open image {path}: {source}")]
    OpenImage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {0} is not a regular file or block device")]
    NotAnImage(PathBuf),
    #[error("image {0} is smaller than one 512-byte sector")]
    ImageTooSmall(PathBuf),
    #[error("image {0} is in use (locked by another export or process)")]
    ImageLocked(PathBuf),
}

/// The keys of an `--export` spec.
static GRAMMAR: Grammar = Grammar {
    keys: &[
        Key::value("socket", "PATH"),
        Key::value("image", "PATH"),
        Key::flag("readonly"),
        Key::maybe_empty("id", "SERIAL"),
        Key::value("memory", "MIB"),
        Key::value("frontend-uid", "UID"),
    ],
    usage: "socket=PATH,image=PATH[,readonly][,id=SERIAL][,memory=MIB][,frontend-uid=UID]",
};

/// A parsed `--export` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// vhost-user socket part-io listens on.
    pub socket: PathBuf,
    /// Raw image file (or block device).
    pub image: PathBuf,
    /// Export read-only (`VIRTIO_BLK_F_RO`; writes fail with `VIRTIO_BLK_S_IOERR`).
    pub readonly: bool,
    /// Serial returned by `VIRTIO_BLK_T_GET_ID` (default: the image's file name, truncated).
    pub id: Option<String>,
    /// The partition's granted memory in bytes (`memory=MIB`): a frontend
    /// whose memory table maps more is refused.
    pub memory_limit: Option<u64>,
    /// The only uid whose frontend may connect (`frontend-uid=UID`).
    pub frontend_uid: Option<u32>,
}

impl FromStr for ExportSpec {
    type Err = ExportError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let wrap = |source| ExportError::Spec {
            spec: spec.to_string(),
            source,
        };
        let items = crate::spec::parse(spec, &GRAMMAR).map_err(wrap)?;
        let id = items.value("id");
        if let Some(id) = id.filter(|id| id.len() > VIRTIO_BLK_ID_BYTES as usize) {
            return Err(ExportError::IdTooLong {
                spec: spec.to_string(),
                id: id.to_string(),
            });
        }
        Ok(ExportSpec {
            socket: items.required("socket").map_err(wrap)?.into(),
            image: items.required("image").map_err(wrap)?.into(),
            readonly: items.flag("readonly").unwrap_or(false),
            id: id.map(str::to_string),
            memory_limit: items.memory_limit().map_err(wrap)?,
            frontend_uid: items.frontend_uid().map_err(wrap)?,
        })
    }
}

/// Per-export counters, shared by all connections of the export.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Requests completed with `VIRTIO_BLK_S_OK`.
    pub ok: AtomicU64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR`.
    pub ioerr: AtomicU64,
    /// Requests completed with `VIRTIO_BLK_S_UNSUPP`.
    pub unsupp: AtomicU64,
    /// Malformed chains, per [`Malformed`] kind.
    pub malformed: [AtomicU64; Malformed::ALL.len()],
    /// Connections refused because a memory region failed the seal check.
    pub refused_regions: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl ExportStats {
    /// Counts one malformed chain of `kind`; returns the new count of that kind.
    pub fn count_malformed(&self, kind: Malformed) -> u64 {
        self.malformed[kind.index()].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// One line with every counter, for logs.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "ok={} ioerr={} unsupp={} refused_regions={} connections={}",
            self.ok.load(Ordering::Relaxed),
            self.ioerr.load(Ordering::Relaxed),
            self.unsupp.load(Ordering::Relaxed),
            self.refused_regions.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        );
        for kind in Malformed::ALL {
            s.push_str(&format!(
                " malformed.{}={}",
                kind.name(),
                self.malformed[kind.index()].load(Ordering::Relaxed)
            ));
        }
        s
    }
}

/// An opened export: the image and everything a connection needs.
#[derive(Debug)]
pub struct Export {
    /// The spec it was opened from.
    pub spec: ExportSpec,
    /// The image, opened read-write unless the export is read-only, and
    /// `flock`ed (exclusive, or shared when read-only).
    pub image: File,
    /// Usable size in bytes: the image size rounded down to whole sectors.
    /// Every request is checked against it.
    pub size: u64,
    /// `VIRTIO_BLK_T_GET_ID` answer, zero-padded.
    pub id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Counters.
    pub stats: ExportStats,
}

impl Export {
    /// Opens and locks the image of `spec`.
    pub fn open(spec: ExportSpec) -> Result<Self, ExportError> {
        let open_err = |source| ExportError::OpenImage {
            path: spec.image.clone(),
            source,
        };
        let mut image =
            partvisor_runtime::inherited::open(&spec.image, !spec.readonly).map_err(open_err)?;
        let ft = image.metadata().map_err(open_err)?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(ExportError::NotAnImage(spec.image.clone()));
        }
        let op = if spec.readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(image.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(ExportError::ImageLocked(spec.image.clone()));
            }
            return Err(open_err(e));
        }
        let bytes = image.seek(SeekFrom::End(0)).map_err(open_err)?;
        let size = bytes - bytes % SECTOR_SIZE;
        if size == 0 {
            return Err(ExportError::ImageTooSmall(spec.image.clone()));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = match &spec.id {
            Some(id) => id.clone(),
            None => default_id(&spec.image),
        };
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Export {
            spec,
            image,
            size,
            id,
            stats: ExportStats::default(),
        })
    }

    /// Name used in log lines: the socket path.
    pub fn name(&self) -> std::path::Display<'_> {
        self.spec.socket.display()
    }
}

fn default_id(image: &Path) -> String {
    image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_spec_parses() {
        let s: ExportSpec = "socket=/run/a.sock,image=/img/a.raw,readonly,id=disk-a,memory=64"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            ExportSpec {
                socket: "/run/a.sock".into(),
                image: "/img/a.raw".into(),
                readonly: true,
                id: Some("disk-a".into()),
                memory_limit: Some(64 << 20),
                frontend_uid: None,
            }
        );
        for bad in ["memory=0", "memory=x", "memory=-1"] {
            let e = format!("socket=a,image=b,{bad}")
                .parse::<ExportSpec>()
                .unwrap_err();
            assert!(e.to_string().contains("not a size in MiB"), "{e}");
        }
        let s: ExportSpec = "image=b.raw,socket=b.sock".parse().unwrap();
        assert!(!s.readonly);
        assert_eq!(s.id, None);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let e = |s: &str| s.parse::<ExportSpec>().unwrap_err().to_string();
        assert!(e("image=a.raw").contains("missing `socket=PATH`"));
        assert!(e("socket=a.sock").contains("missing `image=PATH`"));
        assert!(e("socket=a,image=b,size=3").contains("unknown key `size`"));
        assert!(e("socket=a,socket=c,image=b").contains("`socket` given twice"));
        assert!(e("socket=,image=b").contains("expected key=value"));
        assert!(e("socket=a,image=b,id=123456789012345678901").contains("longer than 20"));
    }

    #[test]
    fn readonly_off_and_an_empty_id_parse() {
        let s: ExportSpec = "image=b,socket=s,readonly=off,id=".parse().unwrap();
        assert!(!s.readonly);
        assert_eq!(s.id.as_deref(), Some(""));
    }

    #[test]
    fn spec_errors_name_the_export_and_the_key() {
        let e = |s: &str| s.parse::<ExportSpec>().unwrap_err().to_string();
        assert_eq!(
            e("socket=a,image=b,readonly=yes"),
            "export `socket=a,image=b,readonly=yes`: `readonly` is a flag: give it alone or as readonly=on|off, not `readonly=yes`"
        );
        assert_eq!(
            e("socket=a,image=b,size=3"),
            "export `socket=a,image=b,size=3`: unknown key `size` (known: socket, image, readonly, id, memory, frontend-uid)"
        );
        assert_eq!(e("socket=a"), "export `socket=a`: missing `image=PATH`");
    }
}
