//! Shared-pool shares as CPU weights: each monitor runs in its own cgroup
//! under `partvisor/` (a partition without a `cpu_share` gets the weight of
//! one pool CPU; its dedicated CPUs confine it anyway), weighted by its
//! share (cgroup v1 `cpu.shares` = share × 1024 / 1000, v2 `cpu.weight` =
//! share / 10). Weights are work-conserving: an idle pool lets a partition
//! use more, a busy one splits the pool's CPUs in proportion to the shares
//! the resource database granted (whose sum never exceeds the pool).
//! Partitions with dedicated CPUs are confined by affinity instead.
//!
//! The `partvisor/` directory sits under partd's own cgroup (from
//! `/proc/self/cgroup`): the unit's cgroup under systemd (`Delegate=yes`
//! hands that subtree to partd). On cgroup v2 that is used only when systemd
//! marked it delegated (otherwise the tree's root, as when partd runs by
//! hand), and since a cgroup with processes cannot enable controllers for its
//! children, a delegated partd first moves itself into a `partd` leaf. A
//! restart by systemd then puts the new partd back into the unit's cgroup,
//! which v2 refuses while controllers are enabled there; systemd 254's
//! `DelegateSubgroup=partd` solves that. With an older systemd on v2 a
//! restart of partd while its monitors run may fail. (The machines this is
//! tested on run v1, where that rule does not exist; the restart is tested
//! there.)
//!
//! Best effort: where no writable cpu controller exists, partd logs why
//! once and runs monitors without a cgroup.

use std::path::{Path, PathBuf};

/// Where partd places monitors.
#[derive(Clone, Debug)]
pub enum CpuCgroups {
    /// cgroup v1 cpu controller: `<mount>/partvisor`.
    V1(PathBuf),
    /// cgroup v2: `<root>/partvisor` with the cpu controller enabled.
    V2(PathBuf),
    /// Not available, and why.
    Off(String),
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", path.display())),
    }
}

impl CpuCgroups {
    /// Finds a writable cpu controller under `root` (normally
    /// `/sys/fs/cgroup`) below partd's own cgroup, which `proc_self_cgroup`
    /// (the text of `/proc/self/cgroup`) names.
    pub fn detect(root: &Path, proc_self_cgroup: &str) -> CpuCgroups {
        let attempt = || -> Result<CpuCgroups, String> {
            if root.join("cgroup.controllers").exists() {
                // Below our own cgroup only when systemd delegated it to us;
                // a session scope or someone else's unit is not ours to
                // restructure.
                let own = root.join(own_path(proc_self_cgroup, None));
                let own = if own != root && delegated(&own) {
                    own
                } else {
                    root.to_path_buf()
                };
                let controllers = std::fs::read_to_string(own.join("cgroup.controllers"))
                    .map_err(|e| format!("reading {}/cgroup.controllers: {e}", own.display()))?;
                if !controllers.split_whitespace().any(|c| c == "cpu") {
                    return Err(format!("{} has no cpu controller", own.display()));
                }
                if own != root {
                    // No internal processes: partd leaves the cgroup whose
                    // children it weights.
                    let leaf = own.join("partd");
                    mkdir(&leaf)?;
                    write(&leaf.join("cgroup.procs"), "0")?;
                }
                write(&own.join("cgroup.subtree_control"), "+cpu")?;
                let base = own.join("partvisor");
                mkdir(&base)?;
                write(&base.join("cgroup.subtree_control"), "+cpu")?;
                Ok(CpuCgroups::V2(base))
            } else if root.join("cpu/cpu.shares").exists() {
                let base = root
                    .join("cpu")
                    .join(own_path(proc_self_cgroup, Some("cpu")))
                    .join("partvisor");
                mkdir(&base)?;
                Ok(CpuCgroups::V1(base))
            } else {
                Err(format!("no cpu controller under {}", root.display()))
            }
        };
        attempt().unwrap_or_else(CpuCgroups::Off)
    }

    /// The cgroup of partition `name`'s monitor `pid` (`<name>.<pid>`, so
    /// several partds never share one), if cgroups are in use.
    pub fn dir(&self, name: &str, pid: u32) -> Option<PathBuf> {
        match self {
            CpuCgroups::V1(b) | CpuCgroups::V2(b) => Some(b.join(format!("{name}.{pid}"))),
            CpuCgroups::Off(_) => None,
        }
    }

    /// Puts process `pid` in partition `name`'s cgroup weighted by
    /// `share_milli`. Returns the cgroup used.
    pub fn place(&self, name: &str, pid: u32, share_milli: u32) -> Result<Option<PathBuf>, String> {
        let Some(dir) = self.dir(name, pid) else {
            return Ok(None);
        };
        mkdir(&dir)?;
        match self {
            CpuCgroups::V1(_) => {
                let shares = (u64::from(share_milli) * 1024 / 1000).clamp(2, 262_144);
                write(&dir.join("cpu.shares"), &shares.to_string())?;
            }
            CpuCgroups::V2(_) => {
                let weight = (share_milli / 10).clamp(1, 10_000);
                write(&dir.join("cpu.weight"), &weight.to_string())?;
            }
            CpuCgroups::Off(_) => {}
        }
        write(&dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(Some(dir))
    }

    /// Removes the cgroup of `name`'s monitor `pid` (once it is gone).
    pub fn remove(&self, name: &str, pid: u32) {
        if let Some(dir) = self.dir(name, pid) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Whether systemd delegated `dir` (it marks a delegated cgroup with the
/// `trusted.delegate` extended attribute, systemd 251 and later).
fn delegated(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated and outlive the call; with a
    // null buffer and size 0 getxattr only reports the value's length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"trusted.delegate".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n >= 0
}

/// partd's own cgroup in the v1 hierarchy of `controller`, or in the v2
/// tree for `None`, relative to the hierarchy's root ("" for the root).
fn own_path(proc_self_cgroup: &str, controller: Option<&str>) -> PathBuf {
    proc_self_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, list, path) = (f.next()?, f.next()?, f.next()?);
            let ours = match controller {
                None => list.is_empty(),
                Some(c) => list.split(',').any(|x| x == c),
            };
            ours.then(|| PathBuf::from(path.trim_start_matches('/')))
        })
        .next()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_layout_gets_shares_and_the_pid() {
        // A fake v1 hierarchy in a temp dir: files are plain files there.
        let root = std::env::temp_dir().join(format!("pv-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("cpu")).unwrap();
        std::fs::write(root.join("cpu/cpu.shares"), "1024").unwrap();
        let cg = CpuCgroups::detect(&root, "");
        assert!(matches!(cg, CpuCgroups::V1(_)), "{cg:?}");
        let dir = cg.place("web", 42, 500).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.shares")).unwrap(),
            "512"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "42"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn under_a_delegated_cgroup_the_monitors_go_below_partds_own() {
        let root = std::env::temp_dir().join(format!("pv-cg-deleg-{}", std::process::id()));
        let unit = root.join("cpu/system.slice/partd.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(root.join("cpu/cpu.shares"), "1024").unwrap();
        let own = "12:pids:/system.slice/partd.service\n\
                   4:cpu,cpuacct:/system.slice/partd.service\n\
                   1:name=systemd:/system.slice/partd.service\n0::/\n";
        let cg = CpuCgroups::detect(&root, own);
        match &cg {
            CpuCgroups::V1(b) => assert_eq!(b, &unit.join("partvisor")),
            other => panic!("{other:?}"),
        }
        assert_eq!(own_path(own, None), PathBuf::new());
        assert_eq!(own_path("0::/a/b\n", None), PathBuf::from("a/b"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_controller_is_off_with_a_reason() {
        let root = std::env::temp_dir().join(format!("pv-cg-none-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let cg = CpuCgroups::detect(&root, "");
        match &cg {
            CpuCgroups::Off(why) => assert!(why.contains("no cpu controller"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(cg.place("web", 1, 100).unwrap(), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
