//! Who each process of a partition runs as and what it may see: the
//! coordinator's side of [`crate::jail`] (uids from the partition's grant,
//! directories and sockets handed to them).

use std::path::Path;

use super::*;
use crate::jail::{give_socket, own_dir, Confinement, Identities};

impl Coordinator {
    /// The uids `id`'s monitor and disk backend run as: the two its create
    /// granted, or partd's own when jailing is off.
    pub(super) fn identities(&self, id: &PartitionId) -> Result<Identities, CoordError> {
        if self.settings.jail.is_none() {
            let own = self.settings.own_uid;
            return Ok(Identities {
                monitor: own,
                disks: own,
            });
        }
        match self.db.holdings(id)?.uids[..] {
            [monitor, disks, ..] => Ok(Identities { monitor, disks }),
            _ => Err(CoordError::NoUids { id: id.clone() }),
        }
    }

    /// The uid of the host's shared I/O partitions.
    pub(super) fn io_uid(&self) -> u32 {
        self.settings
            .jail
            .as_ref()
            .map_or(self.settings.own_uid, |j| j.io_uid)
    }

    /// Creates `dir` for `uid` (mode `mode`, group `gid`).
    pub(super) fn own(&self, dir: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), CoordError> {
        own_dir(dir, uid, gid, mode).map_err(|source| CoordError::Ownership {
            path: dir.to_owned(),
            source,
        })
    }

    /// Hands `socket` to `uid` (the one monitor that may connect).
    pub(super) fn hand_over(
        &self,
        socket: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<(), CoordError> {
        give_socket(socket, uid, gid, mode).map_err(|source| CoordError::Ownership {
            path: socket.to_owned(),
            source,
        })
    }

    /// The monitor's jail: its run directory, the directories of its
    /// devices' sockets.
    pub(super) fn monitor_jail(
        &self,
        id: &PartitionId,
        def: &Definition,
        files: &PartitionFiles,
        devices: &[DeviceConfig],
    ) -> Result<Confinement, CoordError> {
        let seccomp = Some(self.settings.seccomp);
        let Some(j) = &self.settings.jail else {
            return Ok(Confinement {
                jail: None,
                seccomp,
            });
        };
        // A missing program is named with the option that sets it.
        if let Err(source) = std::fs::metadata(&self.settings.vmm) {
            return Err(CoordError::Monitor {
                id: id.clone(),
                source: crate::process::ProcessError::Spawn {
                    vmm: self.settings.vmm.clone(),
                    source,
                },
            });
        }
        let ids = self.identities(id)?;
        let mut dirs: Vec<PathBuf> = devices
            .iter()
            .filter_map(|d| {
                let (DeviceConfig::VhostUserBlk { socket }
                | DeviceConfig::VhostUserNet { socket }
                | DeviceConfig::VhostUserVsock { socket, .. }) = d;
                socket.parent().map(Path::to_owned)
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        j.monitor(
            ids.monitor,
            &self.settings.vmm,
            &files.run_dir(),
            &dirs,
            def.memory_mib,
        )
        .map(|jail| Confinement {
            jail: Some(jail),
            seccomp,
        })
        .map_err(|source| CoordError::Confine {
            id: id.clone(),
            source,
        })
    }

    /// A part-io jail: `uid`, writing only in `writable`.
    pub(super) fn io_jail(
        &self,
        id: &PartitionId,
        uid: u32,
        writable: &[PathBuf],
        open_files: u64,
        largest_file: u64,
    ) -> Result<Confinement, CoordError> {
        let seccomp = Some(self.settings.seccomp);
        let Some(j) = &self.settings.jail else {
            return Ok(Confinement {
                jail: None,
                seccomp,
            });
        };
        if let Err(source) = std::fs::metadata(&self.settings.part_io) {
            return Err(CoordError::Backend {
                id: id.clone(),
                source: crate::io::IoError::Spawn {
                    bin: self.settings.part_io.clone(),
                    source,
                },
            });
        }
        j.io(
            uid,
            &self.settings.part_io,
            writable,
            open_files,
            largest_file,
        )
        .map(|jail| Confinement {
            jail: Some(jail),
            seccomp,
        })
        .map_err(|source| CoordError::Confine {
            id: id.clone(),
            source,
        })
    }
}
