//! Shared-pool shares as CPU weights: each monitor runs in its own cgroup
//! under `partvisor/` (a partition without a `cpu_share` gets the weight of
//! one pool CPU; its dedicated CPUs confine it anyway), weighted by its
//! share (cgroup v1 `cpu.shares` = share × 1024 / 1000, v2 `cpu.weight` =
//! share / 10). Weights are work-conserving: an idle pool lets a partition
//! use more, a busy one splits the pool's CPUs in proportion to the shares
//! the resource database granted (whose sum never exceeds the pool).
//! Partitions with dedicated CPUs are confined by affinity instead.
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
    /// Finds a writable cpu controller under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> CpuCgroups {
        let attempt = || -> Result<CpuCgroups, String> {
            if root.join("cgroup.controllers").exists() {
                let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
                    .map_err(|e| format!("reading cgroup.controllers: {e}"))?;
                if !controllers.split_whitespace().any(|c| c == "cpu") {
                    return Err("cgroup v2 without the cpu controller".into());
                }
                write(&root.join("cgroup.subtree_control"), "+cpu")?;
                let base = root.join("partvisor");
                mkdir(&base)?;
                write(&base.join("cgroup.subtree_control"), "+cpu")?;
                Ok(CpuCgroups::V2(base))
            } else if root.join("cpu/cpu.shares").exists() {
                let base = root.join("cpu/partvisor");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_layout_gets_shares_and_the_pid() {
        // A fake v1 hierarchy in a temp dir: files are plain files there.
        let root = std::env::temp_dir().join(format!("pv-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("cpu")).unwrap();
        std::fs::write(root.join("cpu/cpu.shares"), "1024").unwrap();
        let cg = CpuCgroups::detect(&root);
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
    fn missing_controller_is_off_with_a_reason() {
        let root = std::env::temp_dir().join(format!("pv-cg-none-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let cg = CpuCgroups::detect(&root);
        match &cg {
            CpuCgroups::Off(why) => assert!(why.contains("no cpu controller"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(cg.place("web", 1, 100).unwrap(), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
