//! # partvisor-seccomp: the system calls each thread of ours may make
//!
//! One seccomp filter per thread role, an allowlist compiled at build time
//! (`build.rs`, seccompiler) from `filters/x86_64.json`: the roles are the
//! kinds of threads partvisor runs where guest- or frontend-reachable code
//! runs ([`Role`]). A thread installs its role's filter itself, once it has
//! opened what it needs and before it handles anything a guest or a
//! frontend controls; threads it starts afterwards inherit it (and may add
//! their own, narrower one: stacked filters all apply).
//!
//! A system call outside the allowlist kills the whole process with
//! SIGSYS ([`Mode::Enforce`], the default), or is allowed and logged by
//! the kernel's audit log (`dmesg`, type 1326, [`Mode::Log`], for finding
//! what a change needs), or nothing is installed ([`Mode::Off`]).
//!
//! Must never: install a filter that was not compiled from the policy
//! file, or install anything in [`Mode::Off`].

use std::str::FromStr;

use seccompiler::BpfProgram;

include!(concat!(env!("OUT_DIR"), "/filters.rs"));

/// A kind of thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// part-vmm's main thread once the VM is built: the event loop, its
    /// devices' backends and the control socket.
    VmmEventLoop,
    /// A part-vmm vCPU thread: KVM_RUN and the exits it handles.
    VmmVcpu,
    /// Every thread of a part-io process once its sockets are bound: the
    /// listeners, the vhost-user message guard and daemons, the queue
    /// workers, the relay's host connections.
    Io,
    /// A part-io blk or net queue worker (on top of [`Role::Io`]): reads and
    /// writes guest memory, images and eventfds; opens, connects and starts
    /// nothing.
    IoQueue,
}

impl Role {
    /// Every role, in declaration order.
    pub const ALL: [Role; 4] = [Role::VmmEventLoop, Role::VmmVcpu, Role::Io, Role::IoQueue];

    /// The role's name in the policy file.
    pub fn name(self) -> &'static str {
        match self {
            Role::VmmEventLoop => "vmm-event-loop",
            Role::VmmVcpu => "vmm-vcpu",
            Role::Io => "io",
            Role::IoQueue => "io-queue",
        }
    }
}

/// What a filter does with a system call outside its role's list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Kill the process (SIGSYS).
    #[default]
    Enforce,
    /// Allow it and have the kernel log it.
    Log,
    /// Install no filter.
    Off,
}

impl Mode {
    /// As given on a command line (`--seccomp on|log|off`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }
}

impl FromStr for Mode {
    type Err = SeccompError;
    fn from_str(s: &str) -> Result<Mode, SeccompError> {
        match s {
            "on" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(SeccompError::Mode(other.to_string())),
        }
    }
}

/// Errors of this layer.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp mode {0:?}: give on, log or off")]
    Mode(String),
    #[error("no seccomp filter for role {0} was compiled in")]
    Missing(&'static str),
    #[error("cannot install the {role} seccomp filter: {source}")]
    Install {
        role: &'static str,
        source: seccompiler::Error,
    },
}

/// The compiled program of `role` for `mode` (`None` for [`Mode::Off`]).
pub fn program(role: Role, mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    let Some(&(_, kill, log)) = FILTERS.iter().find(|(name, _, _)| *name == role.name()) else {
        return Err(SeccompError::Missing(role.name()));
    };
    let bytes = match mode {
        Mode::Enforce => kill,
        Mode::Log => log,
        Mode::Off => return Ok(None),
    };
    Ok(Some(
        bytes
            .chunks_exact(8)
            .map(|c| seccompiler::sock_filter {
                code: u16::from_le_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect(),
    ))
}

/// Installs `role`'s filter on the calling thread (and so on the threads
/// it starts afterwards); sets `NO_NEW_PRIVS` (seccompiler does). Nothing
/// in [`Mode::Off`].
pub fn install(role: Role, mode: Mode) -> Result<(), SeccompError> {
    let Some(prog) = program(role, mode)? else {
        return Ok(());
    };
    seccompiler::apply_filter(&prog).map_err(|source| SeccompError::Install {
        role: role.name(),
        source,
    })
}

/// The process's mode for [`enter_role`], set once by its `main`.
static PROCESS_MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();

thread_local! {
    /// Whether this thread entered its role already.
    static ENTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets the mode [`enter_role`] installs filters with (the process's
/// `--seccomp`); the first call wins.
pub fn set_process_mode(mode: Mode) {
    let _ = PROCESS_MODE.set(mode);
}

/// Installs `role`'s filter on the calling thread the first time it is
/// called on that thread, with the process's mode ([`Mode::Enforce`] if
/// none was set): for threads a library starts (vhost-user-backend's
/// queue workers), which enter their role in the first callback they run.
pub fn enter_role(role: Role) -> Result<(), SeccompError> {
    if ENTERED.with(std::cell::Cell::get) {
        return Ok(());
    }
    install(role, PROCESS_MODE.get().copied().unwrap_or_default())?;
    ENTERED.with(|e| e.set(true));
    Ok(())
}

#[cfg(test)]
mod tests;
