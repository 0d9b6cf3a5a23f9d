//! The one error type of part-vmm. Every message names what to fix.

use std::path::PathBuf;

/// Errors of the partition monitor. `Config` variants are caused by bad input
/// and end part-vmm with [`crate::exit::ExitStatus::BadInput`]; the others are
/// VMM failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("kernel {path}: cannot read: {source}")]
    KernelUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0}: neither an ELF (vmlinux with a PVH note) nor a bzImage")]
    KernelFormat(PathBuf),
    #[error("kernel {0}: ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); part-vmm boots ELF kernels only through PVH")]
    KernelNoPvh(PathBuf),
    #[error("kernel {path}: cannot load: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("initrd {path}: cannot read: {source}")]
    InitrdUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("guest memory: cannot create a sealed memfd of {size} bytes: {source}")]
    GuestMemfd {
        size: u64,
        source: channels::ChannelError,
    },
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("serial: {0}")]
    Serial(String),
    #[error("setup: {0}")]
    Setup(String),
    #[error("vhost-user backend {socket}: {reason}")]
    Backend { socket: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    /// True when the error was caused by the operator's input rather than by
    /// the host or by part-vmm itself.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::KernelUnreadable { .. }
                | Error::KernelFormat(_)
                | Error::KernelNoPvh(_)
                | Error::KernelLoad { .. }
                | Error::InitrdUnreadable { .. }
                | Error::InitrdTooLarge { .. }
                | Error::CmdlineTooLong { .. }
                | Error::Backend { .. }
        )
    }

    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
