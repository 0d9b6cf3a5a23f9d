//! Partitions belong to the uid that created them, and their files are
//! opened with that uid's rights (issue 12, item 1): partd runs as root
//! here and uid 65534 is allowlisted.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use partvisor_e2e::{guest, vm_lock, Partd};

const NOBODY: u32 = 65534;
const BOOT: Duration = Duration::from_secs(60);

fn world_readable(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A definition uid 65534 can read, booting `kernel`, with `extra` TOML.
fn definition(dir: &Path, name: &str, kernel: &Path, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\nmemory_mib = 32\nkernel = \"{}\"\ncmdline = \"stay\"\n{extra}\n",
            kernel.display()
        ),
    )
    .unwrap();
    world_readable(&p, 0o644);
    p
}

/// The JSON reply partctl printed (`--json`), for a failed command.
fn reply(out: &std::process::Output) -> serde_json::Value {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn an_unprivileged_uid_opens_only_its_own_files_and_acts_only_on_its_own_partitions() {
    let _vm = vm_lock();
    let partd = Partd::start(&["--group", "nogroup", "--allow-uid", "65534"]);
    world_readable(partd.path(), 0o755);
    // A guest kernel and definitions uid 65534 can reach.
    let public = partd.path().join("public");
    let k = public.join("k");
    std::fs::create_dir_all(&k).unwrap();
    world_readable(&public, 0o755);
    world_readable(&k, 0o755);
    let kernel = k.join("guest.elf");
    std::fs::copy(guest(), &kernel).unwrap();
    world_readable(&kernel, 0o644);

    // A file root can read and uid 65534 cannot: refused at create, named.
    let evil = definition(&public, "evil", &kernel, "initrd = \"/etc/shadow\"");
    let r = reply(&partd.run_as(
        NOBODY,
        NOBODY,
        &["--json", "create", evil.to_str().unwrap()],
    ));
    assert_eq!(r["status"], 403, "{r}");
    let msg = r["error"].as_str().unwrap();
    assert!(
        msg.contains("initrd /etc/shadow: uid 65534 cannot open it for reading"),
        "{msg}"
    );
    // Nor can it name the owner itself.
    let claim = definition(&public, "claim", &kernel, "owner_uid = 0");
    let out = partd.run_as(
        NOBODY,
        NOBODY,
        &["--json", "create", claim.to_str().unwrap()],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && text.contains("owner_uid"),
        "{text}"
    );

    // Its own partition: created with it as the owner.
    let mine = definition(&public, "mine", &kernel, "");
    let out = partd.run_as(NOBODY, NOBODY, &["create", mine.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        partd.ctl_json(&["show", "mine"])["definition"]["owner_uid"],
        NOBODY
    );

    // The kernel's folder swapped for a symlink after create: the start
    // refuses it, so the guest never boots what the link points at.
    let real = public.join("k.real");
    std::fs::rename(&k, &real).unwrap();
    std::os::unix::fs::symlink(&real, &k).unwrap();
    let r = reply(&partd.run_as(NOBODY, NOBODY, &["--json", "start", "mine"]));
    assert_eq!(r["status"], 400, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("symbolic link"),
        "{r}"
    );
    assert_eq!(partd.ctl_json(&["show", "mine"])["state"], "defined");
    std::fs::remove_file(&k).unwrap();
    std::fs::rename(&real, &k).unwrap();

    // Started by its owner it boots, from the file partd opened as 65534.
    let out = partd.run_as(NOBODY, NOBODY, &["start", "mine"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    partd.wait_state("mine", "running", BOOT);

    // root's partition is not 65534's to touch.
    partd.create("theirs", "memory_mib = 32");
    for args in [
        &["--json", "start", "theirs"][..],
        &["--json", "stop", "theirs"],
        &["--json", "destroy", "theirs"],
        &["--json", "console", "theirs"],
    ] {
        let r = reply(&partd.run_as(NOBODY, NOBODY, args));
        assert_eq!(r["status"], 403, "{args:?}: {r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("uid 65534 is not its owner (uid 0)"),
            "{args:?}: {r}"
        );
    }
    assert!(partd.log().contains("refused stop of theirs for uid 65534"));
    // Showing is open to every allowlisted uid.
    let out = partd.run_as(NOBODY, NOBODY, &["--json", "show", "theirs"]);
    assert!(out.status.success());

    // Its own it may stop and destroy; root may act on anyone's.
    let out = partd.run_as(NOBODY, NOBODY, &["stop", "mine", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = partd.run_as(NOBODY, NOBODY, &["destroy", "mine"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    partd.ctl_ok(&["destroy", "theirs"]);
}
