//! The one error type of part-vmm. Every message names what to fix; every
//! variant keeps the error that caused it.

use std::path::PathBuf;

use crate::config::ConfigError;

/// Errors of the partition monitor. The variants [`Error::is_bad_input`]
/// names are caused by the operator's input and end part-vmm with
/// [`crate::exit::ExitStatus::BadInput`]; the others are VMM failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} socket {path} already exists; remove it or choose another path")]
    SocketExists { what: &'static str, path: PathBuf },
    #[error("{what} socket: cannot listen on {path}: {source}")]
    SocketBind {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path}: cannot read: {source}")]
    KernelUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0}: neither an ELF (vmlinux with a PVH note) nor a bzImage")]
    KernelFormat(PathBuf),
    #[error("kernel {0}: ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); part-vmm boots ELF kernels only through PVH")]
    KernelNoPvh(PathBuf),
    #[error("kernel {0}: bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")]
    KernelNot64Bit(PathBuf),
    #[error("kernel {path}: cannot load: {source}")]
    KernelLoad {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path}: cannot read: {source}")]
    InitrdUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("guest memory: {mib} MiB is more than this host can address")]
    MemoryTooLarge { mib: u64 },
    #[error("guest memory: cannot map it: {0}")]
    MemoryMap(#[source] vm_memory::mmap::FromRangesError),
    #[error("guest memory: a region has no host mapping: {0}")]
    RegionUnmapped(#[source] vm_memory::GuestMemoryError),
    #[error("guest memory: cannot write {what}: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("guest memory: cannot read {what}: {source}")]
    GuestRead {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("boot: cannot write {what}: {source}")]
    BootConfigure {
        what: &'static str,
        source: linux_loader::configurator::Error,
    },
    #[error("boot: the memory map has {entries} entries, boot_params holds {max}")]
    MemoryMapTooLong { entries: usize, max: usize },
    #[error("ACPI tables need {need} bytes, more than the {reserved} reserved")]
    AcpiTooLarge { need: u64, reserved: u64 },
    #[error(
        "/proc/meminfo has no MemAvailable line; cannot tell how much memory the host has free"
    )]
    NoMemAvailable,
    #[error("the KVM descriptor given (--kvm-fd) is not /dev/kvm (API version is not 12)")]
    NotKvm,
    #[error(transparent)]
    Seccomp(partvisor_seccomp::SeccompError),
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
    #[error("KVM: cannot build the boot MSR list: {0}")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("KVM refused MSR {index:#x}")]
    MsrRefused { index: u32 },
    #[error("serial: cannot open {path}: {source}")]
    SerialOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    EventManager(#[source] event_manager::Error),
    #[error("vhost-user backend {socket}: {what}: {source}")]
    Backend {
        socket: PathBuf,
        what: &'static str,
        source: vhost::Error,
    },
    #[error(
        "vhost-user backend {socket}: does not offer VIRTIO_F_VERSION_1 (part-vmm is modern-only)"
    )]
    BackendNotModern { socket: PathBuf },
    #[error("vhost-user backend {socket}: its config space gives the guest CID {got}, but this partition's CID is {expected}; the backend serves another partition's socket")]
    VsockCidMismatch {
        socket: PathBuf,
        expected: u32,
        got: u64,
    },
    #[error(
        "vhost-user backend {socket}: queue {queue}: {ring} ring at {gpa:#x} is outside guest RAM"
    )]
    RingOutsideRam {
        socket: PathBuf,
        queue: usize,
        ring: &'static str,
        gpa: u64,
    },
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
                | Error::SocketExists { .. }
                | Error::SocketBind { .. }
                | Error::KernelUnreadable { .. }
                | Error::KernelFormat(_)
                | Error::KernelNoPvh(_)
                | Error::KernelNot64Bit(_)
                | Error::KernelLoad { .. }
                | Error::InitrdUnreadable { .. }
                | Error::InitrdTooLarge { .. }
                | Error::Backend { .. }
                | Error::BackendNotModern { .. }
                | Error::VsockCidMismatch { .. }
                | Error::RingOutsideRam { .. }
        )
    }

    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    pub(crate) fn configure(
        what: &'static str,
    ) -> impl FnOnce(linux_loader::configurator::Error) -> Error {
        move |source| Error::BootConfigure { what, source }
    }

    pub(crate) fn write(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
        move |source| Error::GuestWrite { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
