use std::os::unix::process::CommandExt;
use std::process::Command;

use super::*;

const LIMITS: Limits = Limits {
    open_files: 64,
    file_size: 1 << 20,
};

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

/// Runs `script` with /bin/sh in `jail`, in a new pid namespace; returns
/// (exit code, stdout, stderr).
fn run_in(jail: &Jail, script: &str) -> (i32, String, String) {
    let prepared = jail.prepare().unwrap();
    let out = in_new_pid_namespace(|| {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        // SAFETY: `enter` is made for a pre_exec closure.
        unsafe { cmd.pre_exec(move || prepared.enter()) };
        cmd.output()
    })
    .unwrap()
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn root() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn a_jailed_child_has_its_uid_no_capabilities_no_new_privs_and_namespaces_of_its_own() {
    let r = root();
    let jail = Jail::new(r.path(), 65534, 65534, LIMITS).system_libraries();
    let (code, out, err) = run_in(
        &jail,
        "cat /proc/self/status; echo ns; for n in mnt pid ipc net uts; do readlink /proc/self/ns/$n; done; \
         echo limits; cat /proc/self/limits; echo pid $$",
    );
    assert_eq!(code, 0, "{err}");
    let (status, rest) = out.split_once("ns\n").unwrap();
    assert_eq!(field(status, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(field(status, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(field(status, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(field(status, "NoNewPrivs"), "1");
    let (ns, limits) = rest.split_once("limits\n").unwrap();
    for (line, n) in ns.lines().zip(["mnt", "pid", "ipc", "net", "uts"]) {
        let mine = std::fs::read_link(format!("/proc/self/ns/{n}")).unwrap();
        assert_ne!(line, mine.to_str().unwrap(), "{n} namespace shared");
    }
    // Its own pid namespace: the shell is its init.
    assert!(limits.contains("pid 1"), "{limits}");
    let row = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("Max open files"), ["64", "64"]);
    assert_eq!(row("Max file size"), ["1048576", "1048576"]);
    assert_eq!(row("Max core file size"), ["0", "0"]);
}

#[test]
fn a_jailed_child_sees_only_what_it_was_given_and_writes_only_where_it_may() {
    let r = root();
    let host = tempfile::tempdir().unwrap();
    let (ro, rw) = (host.path().join("ro"), host.path().join("rw"));
    std::fs::create_dir(&ro).unwrap();
    std::fs::create_dir(&rw).unwrap();
    std::fs::write(ro.join("given"), "readable").unwrap();
    std::fs::write(host.path().join("hidden"), "secret").unwrap();
    // The child's uid owns the writable directory, as partd arranges.
    std::os::unix::fs::chown(&rw, Some(65534), Some(65534)).unwrap();
    let jail = Jail::new(r.path(), 65534, 65534, LIMITS)
        .system_libraries()
        .read_only(&ro)
        .writable(&rw)
        .private_tmp();
    let script = format!(
        "cat {ro}/given; echo; \
         cat {hidden} 2>/dev/null && echo hidden-visible; \
         ls /etc 2>/dev/null && echo etc-visible; \
         echo x > {ro}/new 2>/dev/null && echo ro-writable; \
         echo written > {rw}/out && echo rw-ok; \
         touch /new 2>/dev/null && echo root-writable; \
         touch /tmp/mine && echo tmp-ok; \
         ls /proc | grep -v -e self -e thread-self -e '^[0-9]*$' | head -3; \
         ls /proc | grep -c '^[0-9]*$'",
        ro = ro.display(),
        rw = rw.display(),
        hidden = host.path().join("hidden").display(),
    );
    let (code, out, err) = run_in(&jail, &script);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "readable");
    assert_eq!(lines[1], "rw-ok", "{out}");
    assert_eq!(lines[2], "tmp-ok", "{out}");
    // /proc shows only pids (the shell and its children), nothing else.
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[3].parse::<u32>().unwrap() >= 1, "{out}");
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written\n"
    );
    // The host never sees the jail's mounts.
    assert_eq!(std::fs::read_dir(r.path()).unwrap().count(), 0);
}

#[test]
fn a_write_past_the_file_size_limit_fails_instead_of_killing_the_child() {
    let r = root();
    let host = tempfile::tempdir().unwrap();
    let rw = host.path().join("rw");
    std::fs::create_dir(&rw).unwrap();
    std::os::unix::fs::chown(&rw, Some(65534), Some(65534)).unwrap();
    let jail = Jail::new(
        r.path(),
        65534,
        65534,
        Limits {
            open_files: 64,
            file_size: 4096,
        },
    )
    .system_libraries()
    .writable(&rw);
    let (code, out, err) = run_in(
        &jail,
        &format!(
            "i=0; while [ $i -lt 600 ]; do echo 0123456789abcdef; i=$((i+1)); done > {f}; echo alive; wc -c < {f}",
            f = rw.join("big").display()
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("alive\n"), "{out}");
    assert_eq!(out.lines().nth(1).map(str::trim), Some("4096"), "{out}");
}

#[test]
fn paths_with_dot_dot_or_relative_paths_and_uid_zero_are_refused() {
    let r = root();
    let bad = Jail::new(r.path(), 1000, 1000, LIMITS).read_only("/usr/../etc");
    assert!(matches!(bad.prepare(), Err(JailError::Path { .. })));
    let rel = Jail::new(r.path(), 1000, 1000, LIMITS).read_only("usr");
    assert!(matches!(rel.prepare(), Err(JailError::Path { .. })));
    let zero = Jail::new(r.path(), 0, 1000, LIMITS);
    assert!(matches!(zero.prepare(), Err(JailError::Root0)));
    let missing = Jail::new(r.path().join("none"), 1000, 1000, LIMITS);
    assert!(matches!(missing.prepare(), Err(JailError::Root { .. })));
}

#[test]
fn a_failing_step_fails_the_spawn_with_its_errno_and_names_itself_on_stderr() {
    let r = root();
    // A bind of a path that disappears between prepare and enter.
    let host = tempfile::tempdir().unwrap();
    let gone = host.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let prepared = Jail::new(r.path(), 65534, 65534, LIMITS)
        .system_libraries()
        .read_only(&gone)
        .prepare()
        .unwrap();
    std::fs::remove_dir(&gone).unwrap();
    let log = host.path().join("log");
    let stderr = std::fs::File::create(&log).unwrap();
    let spawned = in_new_pid_namespace(|| {
        let mut cmd = Command::new("/bin/true");
        cmd.stderr(stderr);
        // SAFETY: `enter` is made for a pre_exec closure.
        unsafe { cmd.pre_exec(move || prepared.enter()) };
        cmd.spawn()
    })
    .unwrap();
    let e = spawned.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text,
        format!("partvisor-jail: bind ro {}: errno 2\n", gone.display())
    );
}
