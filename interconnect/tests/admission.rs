//! Who may use a name: directory registrations belong to the uid that made
//! them (`SO_PEERCRED`), and another uid can neither replace, remove nor
//! connect under them. The other uid is a real process (`ic-peer` run as
//! nobody), not a parameter.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use interconnect::{Directory, DirectoryClient, DirectoryServer, IcError};

const NOBODY: u32 = 65534;

fn open_directory() -> (DirectoryServer, std::path::PathBuf) {
    let path = dir_path();
    let dir = DirectoryServer::serve(&path).unwrap();
    // Any local uid may talk to this directory; ownership is checked per
    // request.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    (dir, path)
}

#[test]
fn a_name_held_by_another_uid_cannot_be_registered_claimed_removed_or_connected_as() {
    if partvisor_runtime::peer::own_uid() != 0 {
        // Running a peer as another uid needs root.
        partvisor_runtime::ci::environment_missing("root, to run a peer as another uid");
        return;
    }
    let (_dir, path) = open_directory();
    let mut srv = Proc::spawn(&path, "svc-host", None);
    srv.ok("listen svc cli");
    let root = DirectoryClient::new(&path);
    // The client's name is root's before nobody tries (the client process
    // claims it too, as root, when it starts).
    root.claim("cli").unwrap();
    let mut cli = Proc::spawn(&path, "cli", None);
    // nobody cannot take the client's name...
    let mut squatter = Proc::spawn_as(&path, "cli", NOBODY);
    let e = squatter.answer(Duration::from_secs(10));
    assert!(
        e.starts_with("err setup") && e.contains("\"cli\" belongs to uid 0, not to uid 65534"),
        "{e}"
    );
    // ...nor register over the service's, nor remove it.
    let mut mallory = Proc::spawn_as(&path, "mallory", NOBODY);
    let e = mallory.cmd("listen svc mallory");
    assert!(e.contains("\"svc\" belongs to uid 0"), "{e}");
    let e = mallory.cmd("unregister svc");
    assert!(e.contains("\"svc\" belongs to uid 0"), "{e}");
    // Its own names are its own: it registers one, and root sees it held.
    mallory.ok("listen mallory-svc cli");
    assert!(root.resolve("cli", "mallory-svc").is_ok());
    // Root may reserve a name for a uid; then only that uid gets it.
    root.reserve("web", NOBODY).unwrap();
    let mut web = Proc::spawn_as(&path, "web", NOBODY);
    web.ok("listen web-svc cli");
    let e = web.cmd("listen svc web");
    assert!(e.contains("\"svc\" belongs to uid 0"), "{e}");
    // The service is intact and the real client connects.
    srv.send("accept 10000");
    cli.ok("connect svc tcp");
    assert_eq!(srv.answer(Duration::from_secs(10)), "ok cli");
    assert!(matches!(
        root.resolve("mallory", "svc"),
        Err(IcError::Refused(m)) if m.contains("not on the allowlist")
    ));
}

#[test]
fn secrets_handed_out_for_a_name_stop_working_once_the_name_changes_hands() {
    let (_dir, path) = open_directory();
    let mut srv = Proc::spawn(&path, "svc-host", None);
    srv.ok("listen svc cli");
    srv.send("accept 10000");
    let root = DirectoryClient::new(&path);
    root.claim("cli").unwrap();
    let before = root.resolve("cli", "svc").unwrap();
    let addr = before.endpoint.tcp_addr.unwrap();
    // "cli" is released (and could be claimed by anyone): the service's key
    // changes, so the secret its former holder kept proves nothing...
    root.unregister("cli").unwrap();
    let mut h = Proc::hostile();
    let refused = h.cmd(&format!("hello_tcp {addr} cli svc {}", secret_hex(&before)));
    assert!(
        refused.starts_with("err refused") && refused.contains("no proof"),
        "{refused}"
    );
    // ...while the name's new holder gets a secret that works, the listener
    // learning its new key from the directory.
    root.claim("cli").unwrap();
    let after = root.resolve("cli", "svc").unwrap();
    assert_ne!(after.secret, before.secret);
    h.ok(&format!("hello_tcp {addr} cli svc {}", secret_hex(&after)));
    assert_eq!(srv.answer(Duration::from_secs(10)), "ok cli");
}
