//! A partition definition as partctl reads it (TOML) and partd checks it
//! against the host, then its command line with placeholders filled in:
//! refused with a message, or accepted with a demand and a command line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use partd::definition::{Definition, DefinitionExt, Placeholder};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return;
    };
    let Ok(value) = serde_json::to_value(&table) else {
        return;
    };
    let host = resource_db::HostConfig::empty();
    let Ok(def) = Definition::from_json(value, &host) else {
        return;
    };
    let _ = def.id();
    let _ = def.demand();
    let _ = def.nic_demand();
    let _ = def.share_milli();
    // Placeholders resolve for names that start with "a", not for others.
    let _ = def.expand_cmdline(|p| match p {
        Placeholder::Mac(name, i) if name.starts_with('a') => {
            Some(format!("02:00:00:00:00:{i:02x}"))
        }
        Placeholder::Cid(name) if name.starts_with('a') => Some("3".into()),
        _ => None,
    });
});
