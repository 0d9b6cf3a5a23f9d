use super::*;

/// A system call no role allows (ptrace), made harmlessly: peeking at a
/// pid that does not exist.
fn forbidden() -> libc::c_long {
    // SAFETY: PTRACE_PEEKUSER on a non-existent pid only returns ESRCH.
    unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKUSER, 0x3fff_fff0, 0, 0) }
}

/// Forks a child that installs `prog`, makes an allowed call, then the
/// forbidden one, then exits 7. Returns its pid and wait status.
fn run_child(prog: &BpfProgram) -> (libc::pid_t, libc::c_int) {
    // SAFETY: the child only calls async-signal-safe functions (prctl and
    // seccomp through apply_filter, which does not allocate, getpid,
    // ptrace, _exit) before it ends.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            if seccompiler::apply_filter(prog).is_err() {
                libc::_exit(3);
            }
            if libc::getpid() <= 0 {
                libc::_exit(4);
            }
            forbidden();
            libc::_exit(7);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        (pid, status)
    }
}

/// The kernel's audit line for `pid`'s filtered system calls (`dmesg`),
/// waited for up to 5 s: (syscall number, action code) of each.
fn audited(pid: libc::pid_t) -> Vec<(u32, String)> {
    let needle = format!(" pid={pid} ");
    for _ in 0..50 {
        let out = std::process::Command::new("dmesg").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let found: Vec<(u32, String)> = text
            .lines()
            .filter(|l| l.contains("type=1326") && l.contains(&needle))
            .map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .unwrap_or_default()
                        .to_string()
                };
                (field("syscall=").parse().unwrap(), field("code="))
            })
            .collect();
        if !found.is_empty() {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no audit line for pid {pid} in dmesg");
}

#[test]
fn every_role_has_a_filter_for_each_mode_and_none_when_off() {
    for role in Role::ALL {
        assert!(
            program(role, Mode::Enforce).unwrap().unwrap().len() > 10,
            "{role:?}"
        );
        assert!(
            program(role, Mode::Log).unwrap().unwrap().len() > 10,
            "{role:?}"
        );
        assert!(program(role, Mode::Off).unwrap().is_none());
    }
    assert_eq!(
        FILTERS.len(),
        Role::ALL.len(),
        "a role in the policy file has no Role"
    );
    assert_eq!("log".parse::<Mode>().unwrap(), Mode::Log);
    assert_eq!(
        "yes".parse::<Mode>().unwrap_err().to_string(),
        "seccomp mode \"yes\": give on, log or off"
    );
}

#[test]
fn a_call_outside_each_roles_filter_kills_the_process_with_sigsys() {
    for role in Role::ALL {
        let prog = program(role, Mode::Enforce).unwrap().unwrap();
        let (pid, status) = run_child(&prog);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{role:?}: status {status:#x}"
        );
        // Killed for the forbidden call, and for nothing before it.
        assert_eq!(
            audited(pid),
            [(libc::SYS_ptrace as u32, "0x80000000".to_string())],
            "{role:?}"
        );
    }
}

#[test]
fn with_log_a_call_outside_each_roles_filter_is_allowed_and_the_kernel_logs_it() {
    for role in Role::ALL {
        let prog = program(role, Mode::Log).unwrap().unwrap();
        let (pid, status) = run_child(&prog);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7,
            "{role:?}: status {status:#x}"
        );
        assert_eq!(
            audited(pid),
            [(libc::SYS_ptrace as u32, "0x7ffc0000".to_string())],
            "{role:?}"
        );
    }
}
