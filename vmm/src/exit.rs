//! Why a partition ended, and the process exit status that says so.
//!
//! | status | reason |
//! |---|---|
//! | 0..=63 | the guest wrote that code to the debug-exit port (0xf4) |
//! | 0 | the guest powered off through the ACPI sleep control register (S5) |
//! | 64 | bad input (configuration, kernel, initrd, command line) |
//! | 65 | the guest wrote a debug-exit code above 63 (the code is logged) |
//! | 70 | part-vmm failed (KVM or host error) while running the guest |
//! | 71 | the guest requested a reset (i8042 `0xFE`, ACPI reset register, KVM system event) |
//! | 72 | triple fault (`KVM_EXIT_SHUTDOWN`) |
//! | 73 | KVM could not run the guest: emulation failure / `KVM_EXIT_INTERNAL_ERROR` / failed entry |
//! | 74 | forced stop: the guest did not stop within the polite-stop timeout |

use std::fmt;

/// Largest guest code that passes through unchanged as the exit status.
pub const MAX_GUEST_CODE: u32 = 63;

/// The reason a partition ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote `code` to the debug-exit port.
    GuestExit { code: u32 },
    /// The guest entered ACPI S5 (soft off).
    PowerOff,
    /// The guest asked for a reset.
    Reset { source: &'static str },
    /// Triple fault.
    TripleFault { vcpu: u32 },
    /// KVM could not run the guest; `detail` holds the registers.
    InternalError { vcpu: u32, detail: String },
    /// The polite-stop timeout expired.
    ForcedStop { timeout_ms: u64 },
    /// part-vmm itself failed.
    VmmError { detail: String },
}

impl ExitReason {
    /// The process exit status for this reason (see the module table).
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::GuestExit { code } if *code <= MAX_GUEST_CODE => *code as i32,
            ExitReason::GuestExit { .. } => 65,
            ExitReason::PowerOff => 0,
            ExitReason::Reset { .. } => 71,
            ExitReason::TripleFault { .. } => 72,
            ExitReason::InternalError { .. } => 73,
            ExitReason::ForcedStop { .. } => 74,
            ExitReason::VmmError { .. } => 70,
        }
    }

    /// Short machine-friendly name used in the exit log line.
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::GuestExit { .. } => "guest-exit",
            ExitReason::PowerOff => "power-off",
            ExitReason::Reset { .. } => "reset",
            ExitReason::TripleFault { .. } => "triple-fault",
            ExitReason::InternalError { .. } => "internal-error",
            ExitReason::ForcedStop { .. } => "forced-stop",
            ExitReason::VmmError { .. } => "vmm-error",
        }
    }
}

/// Status for bad input (usage, configuration, kernel or initrd problems).
pub const STATUS_BAD_INPUT: i32 = 64;
/// Status for a part-vmm failure before the guest ran.
pub const STATUS_VMM_ERROR: i32 = 70;

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reason={} status={}", self.name(), self.status())?;
        match self {
            ExitReason::GuestExit { code } => write!(f, " code={code}"),
            ExitReason::PowerOff => write!(f, " (ACPI S5)"),
            ExitReason::Reset { source } => write!(f, " source={source}"),
            ExitReason::TripleFault { vcpu } => write!(f, " vcpu={vcpu}"),
            ExitReason::InternalError { vcpu, detail } => write!(f, " vcpu={vcpu} {detail}"),
            ExitReason::ForcedStop { timeout_ms } => {
                write!(f, " guest ignored the stop request for {timeout_ms} ms")
            }
            ExitReason::VmmError { detail } => write!(f, " {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_codes_pass_through_and_reserved_reasons_have_distinct_statuses() {
        assert_eq!(ExitReason::GuestExit { code: 7 }.status(), 7);
        assert_eq!(ExitReason::GuestExit { code: 63 }.status(), 63);
        assert_eq!(ExitReason::GuestExit { code: 64 }.status(), 65);
        let reserved = [
            ExitReason::Reset { source: "i8042" }.status(),
            ExitReason::TripleFault { vcpu: 0 }.status(),
            ExitReason::InternalError {
                vcpu: 0,
                detail: String::new(),
            }
            .status(),
            ExitReason::ForcedStop { timeout_ms: 1 }.status(),
            ExitReason::VmmError {
                detail: String::new(),
            }
            .status(),
            STATUS_BAD_INPUT,
        ];
        let mut sorted = reserved.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), reserved.len());
        assert!(reserved.iter().all(|s| *s > MAX_GUEST_CODE as i32));
    }
}
