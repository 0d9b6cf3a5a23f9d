//! Who may act on a partition, and the files it boots from opened with the
//! right uid's rights.
//!
//! A partition belongs to the uid that created it (`owner_uid` in its
//! stored definition). Root and partd's own uid may act on every
//! partition; any other allowlisted uid only on its own: start, stop,
//! destroy and the console answer 403 otherwise. Listing and showing stay
//! open to every allowlisted uid.
//!
//! The kernel, initrd and disk images are opened with a uid's rights
//! (`crate::access`): at create as the creating caller, to refuse a file it
//! cannot open, naming it and why; at start again as the owner ([`opener`]:
//! also when root starts it), and the open files are what part-vmm
//! (kernel, initrd) and part-io blk (disks) get, as inherited descriptors,
//! never a path partd would resolve with its own rights.

use std::fs::File;

use super::*;
use crate::access::{self, Caller, Mode};

/// Whose rights a start by `caller` opens `def`'s files with: the owner's.
/// When root (or partd's uid) starts another uid's partition, the owner's
/// paths are still opened with the owner's rights (uid, primary gid and
/// groups from the user database; an owner without an entry gets the
/// overflow gid 65534 and no groups), so a path the owner changed after
/// create cannot borrow root's.
pub(super) fn opener(def: &Definition, caller: &Caller) -> Caller {
    let Some(owner) = def.owner_uid.filter(|o| *o != caller.uid) else {
        return caller.clone();
    };
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner))
        .ok()
        .flatten();
    match user {
        Some(u) => {
            let groups = std::ffi::CString::new(u.name.as_bytes())
                .ok()
                .and_then(|name| nix::unistd::getgrouplist(&name, u.gid).ok())
                .map(|g| g.iter().map(|g| g.as_raw()).collect())
                .unwrap_or_default();
            Caller {
                uid: owner,
                gid: u.gid.as_raw(),
                groups,
            }
        }
        None => Caller {
            uid: owner,
            gid: 65534,
            groups: Vec::new(),
        },
    }
}

/// A partition's boot files, open.
pub(crate) struct BootFiles {
    pub kernel: File,
    pub initrd: Option<File>,
    /// The disk images, in definition order.
    pub disks: Vec<File>,
}

impl Coordinator {
    /// Whether `caller` may `action` partition `id` (it exists and is
    /// theirs, or they are root or partd's own uid).
    pub fn authorize(
        &self,
        id: &PartitionId,
        caller: &Caller,
        action: &'static str,
    ) -> Result<(), CoordError> {
        let rec = self.record(id)?;
        if caller.uid == 0 || caller.uid == self.settings.own_uid {
            return Ok(());
        }
        let owner = serde_json::from_str::<Definition>(&rec.definition)
            .ok()
            .and_then(|d| d.owner_uid);
        if owner == Some(caller.uid) {
            return Ok(());
        }
        tracing::warn!(
            "refused {action} of {id} for uid {}: its owner is {owner:?}",
            caller.uid
        );
        Err(CoordError::NotOwner {
            action,
            id: id.clone(),
            uid: caller.uid,
            owner,
        })
    }

    /// Opens `def`'s kernel, initrd and disk images as `caller`, for
    /// part-vmm (kernel, initrd) and part-io blk (disks).
    pub(super) fn open_boot_files(
        &self,
        id: &PartitionId,
        def: &Definition,
        caller: &Caller,
        action: &'static str,
    ) -> Result<BootFiles, CoordError> {
        let denied = |source| CoordError::Access {
            action,
            id: id.clone(),
            source,
        };
        let kernel = access::open_as(caller, "kernel", &def.kernel, Mode::Read).map_err(denied)?;
        let initrd = def
            .initrd
            .as_ref()
            .map(|p| access::open_as(caller, "initrd", p, Mode::Read))
            .transpose()
            .map_err(denied)?;
        let mut disks = Vec::new();
        for d in &def.disk {
            let mode = if d.read_only {
                Mode::Read
            } else {
                Mode::ReadWrite
            };
            disks.push(access::open_as(caller, "disk image", &d.image, mode).map_err(denied)?);
        }
        Ok(BootFiles {
            kernel,
            initrd,
            disks,
        })
    }
}
