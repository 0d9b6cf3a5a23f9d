//! Every definition in resources/examples/ is accepted by partd as written
//! (with the test guest as kernel), and relative paths resolve against the
//! file's folder.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use partvisor_e2e::{guest, Partd};

#[test]
fn every_example_definition_is_accepted_with_its_keys_intact() {
    let partd = Partd::start(&[]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/examples");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let v = partd.ctl_json(&[
            "create",
            path.to_str().unwrap(),
            "--kernel",
            guest().to_str().unwrap(),
        ]);
        assert_eq!(v["state"], "defined", "{}", path.display());
        for (k, want) in &table {
            if k == "kernel" {
                continue;
            }
            let got = &v["definition"][k];
            let want = serde_json::to_value(want).unwrap();
            assert_eq!(got, &want, "{}: key {k}", path.display());
        }
        names.push(v["name"].as_str().unwrap().to_string());
    }
    names.sort();
    assert_eq!(names, ["linux", "pinned", "testguest"]);

    // Without --kernel the relative path is resolved against the folder.
    let copy = partd.path().join("rel.toml");
    std::fs::copy(guest(), partd.path().join("testguest.elf")).unwrap();
    let text = std::fs::read_to_string(dir.join("testguest.toml"))
        .unwrap()
        .replace("name = \"testguest\"", "name = \"rel\"");
    std::fs::write(&copy, text).unwrap();
    let v = partd.ctl_json(&["create", copy.to_str().unwrap()]);
    assert_eq!(
        v["definition"]["kernel"],
        partd.path().join("testguest.elf").display().to_string()
    );
}
