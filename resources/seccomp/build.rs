//! Compiles `filters/x86_64.json` into one BPF program per thread role and
//! action on mismatch (kill the process, or log and allow), with
//! seccompiler, so the binaries carry filters fixed at build time.
//!
//! The file is seccompiler's JSON format with one addition: a top-level
//! `"groups"` object of named rule lists, and a role's `"use"` list naming
//! the groups its filter starts with (the syscalls every thread of a
//! process makes are written once). The mismatch action is set here.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;

use serde_json::{json, Value};

const MODES: [(&str, &str); 2] = [("kill", "kill_process"), ("log", "log")];

fn main() {
    let src = PathBuf::from("filters/x86_64.json");
    println!("cargo:rerun-if-changed={}", src.display());
    let text = fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let policy: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let groups = policy["groups"].as_object().cloned().unwrap_or_default();
    let roles = policy["roles"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no \"roles\" object", src.display()));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let mut table = String::from("pub(crate) const FILTERS: &[(&str, &[u8], &[u8])] = &[\n");
    for (mode, action) in MODES {
        let mut filters = serde_json::Map::new();
        for (role, def) in roles {
            let mut rules: Vec<Value> = Vec::new();
            for g in def["use"].as_array().into_iter().flatten() {
                let name = g.as_str().unwrap_or_default();
                let group = groups
                    .get(name)
                    .and_then(Value::as_array)
                    .unwrap_or_else(|| panic!("role {role} uses unknown group {name}"));
                rules.extend(group.iter().cloned());
            }
            rules.extend(def["filter"].as_array().into_iter().flatten().cloned());
            // seccompiler wants each syscall once: merge the rules of a
            // syscall named twice (a bare entry allows every argument).
            let mut by_name: BTreeMap<String, Option<Vec<Value>>> = BTreeMap::new();
            for r in rules {
                let name = r["syscall"].as_str().unwrap_or_default().to_string();
                let args = r.get("args").cloned();
                let entry = by_name.entry(name).or_insert_with(|| Some(Vec::new()));
                match (entry.as_mut(), args) {
                    (Some(list), Some(a)) => list.push(a),
                    (_, None) => *entry = None,
                    (None, Some(_)) => {}
                }
            }
            let mut filter = Vec::new();
            for (name, args) in by_name {
                match args {
                    None => filter.push(json!({ "syscall": name })),
                    Some(list) => {
                        for a in list {
                            filter.push(json!({ "syscall": name, "args": a }));
                        }
                    }
                }
            }
            filters.insert(
                role.clone(),
                json!({ "mismatch_action": action, "match_action": "allow", "filter": filter }),
            );
        }
        let json = serde_json::to_vec(&Value::Object(filters)).unwrap_or_default();
        let compiled =
            seccompiler::compile_from_json(json.as_slice(), seccompiler::TargetArch::x86_64)
                .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        for (role, prog) in compiled {
            let mut bytes = Vec::with_capacity(prog.len() * 8);
            for ins in prog {
                bytes.extend_from_slice(&ins.code.to_le_bytes());
                bytes.push(ins.jt);
                bytes.push(ins.jf);
                bytes.extend_from_slice(&ins.k.to_le_bytes());
            }
            let path = out.join(format!("{role}.{mode}.bpf"));
            fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    for role in roles.keys() {
        table.push_str(&format!(
            "    ({role:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{role}.kill.bpf\")), include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{role}.log.bpf\"))),\n"
        ));
    }
    table.push_str("];\n");
    let path = out.join("filters.rs");
    let mut f = fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(table.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
