//! What a test does when its environment is missing.
//!
//! Under `CI=true` a missing environment is a failure: CI machines are set
//! up by `resources/setup.sh`, so anything missing there is a broken set-up
//! step, and a test that printed `skipped:` and passed would hide it. The
//! only exceptions are the things on [`CannotHave`], the project's one list
//! of what CI machines cannot have (ARCHITECTURE.md, "What CI machines
//! cannot have").

use std::fmt::Display;

/// The variable CI sets.
pub const CI_ENV: &str = "CI";

/// Things the project's CI machines cannot have, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CannotHave {
    /// A full Linux userspace boot: nested KVM emulates guest CPL 0 and
    /// Linux stops at its first `int3`/`xrstor`.
    LinuxUserspaceBoot,
    /// An RDMA device: no RDMA hardware and no soft-RoCE module.
    RdmaDevice,
}

impl Display for CannotHave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CannotHave::LinuxUserspaceBoot => "a full Linux userspace boot (nested KVM)",
            CannotHave::RdmaDevice => "an RDMA device",
        })
    }
}

/// True when running under CI (`CI=true`).
pub fn under_ci() -> bool {
    std::env::var(CI_ENV).is_ok_and(|v| v == "true")
}

/// A test's environment is missing. Under CI this panics with `reason`;
/// elsewhere it prints `skipped: <reason>` and the caller returns.
///
/// # Panics
/// Under `CI=true`, always: that is the point.
pub fn environment_missing(reason: impl Display) {
    if under_ci() {
        panic!(
            "environment missing under CI=true: {reason} \
             (resources/setup.sh should provide it; only ARCHITECTURE.md's list may skip)"
        );
    }
    println!("skipped: {reason}");
}

/// A test needs something CI machines cannot have: prints
/// `skipped: <what>: <reason>`, under CI too.
pub fn cannot_have(what: CannotHave, reason: impl Display) {
    println!("skipped: {what}: {reason}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cannot_have_names_the_thing_in_its_display() {
        assert_eq!(CannotHave::RdmaDevice.to_string(), "an RDMA device");
        assert!(CannotHave::LinuxUserspaceBoot
            .to_string()
            .contains("Linux userspace"));
    }

    #[test]
    fn a_missing_environment_fails_exactly_when_ci_is_true() {
        let ci = under_ci();
        let r = std::panic::catch_unwind(|| environment_missing("no widget"));
        assert_eq!(r.is_err(), ci);
    }
}
