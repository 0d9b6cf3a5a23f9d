//! The OpenAPI document's examples are real messages: each one parses into
//! the type partd and partctl use for it, and (for replies) serialises back
//! to the same JSON, so a renamed or dropped field in either shows here.
// Test code: a failed parse of our own document is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use partvisor_api::views::{ErrorBody, PartitionView, StopBody};
use partvisor_api::{Definition, FreeCapacity, LogEntry};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const SPEC: &str = include_str!("../partd.openapi.yaml");

fn spec() -> Value {
    serde_norway::from_str(SPEC).unwrap()
}

/// Follows a `$ref` into the same document.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let path = r.strip_prefix("#/").expect("local $ref");
            path.split('/').fold(doc, |at, key| &at[key])
        }
        None => v,
    }
}

/// Parses `example` as `T`; with `round_trip`, `T` must serialise back to
/// exactly `example`.
fn check<T: DeserializeOwned + Serialize>(example: &Value, round_trip: bool) -> Result<(), String> {
    let typed: T = serde_json::from_value(example.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if round_trip && back != *example {
        return Err(format!("does not round-trip: serialises as {back}"));
    }
    Ok(())
}

/// The shared type a schema stands for, checked against `example`.
fn check_against_schema(schema: &Value, example: &Value) -> Result<(), String> {
    let name = |v: &Value| {
        v.get("$ref")
            .and_then(Value::as_str)
            .map(|r| r.rsplit('/').next().unwrap_or_default().to_owned())
    };
    if let Some(n) = name(schema) {
        return match n.as_str() {
            "Partition" => check::<PartitionView>(example, true),
            "Error" => check::<ErrorBody>(example, true),
            // Definitions are written by people: defaults may be left out.
            "Definition" => check::<Definition>(example, false),
            other => Err(format!("no shared type is known for schema {other}")),
        };
    }
    match (schema["type"].as_str(), name(&schema["items"])) {
        (Some("array"), Some(n)) if n == "Partition" => check::<Vec<PartitionView>>(example, true),
        (Some("array"), Some(n)) if n == "LogEntry" => check::<Vec<LogEntry>>(example, true),
        (Some("object"), _)
            if name(&schema["additionalProperties"]).as_deref() == Some("Capacity") =>
        {
            check::<FreeCapacity>(example, true)
        }
        (Some("object"), _) if schema["properties"].get("timeout_s").is_some() => {
            check::<StopBody>(example, true)
        }
        _ => Err(format!("no shared type is known for schema {schema}")),
    }
}

/// Every (place, schema, example) of a JSON body in the document.
fn examples(doc: &Value) -> Vec<(String, Value, Value)> {
    let mut out = Vec::new();
    let mut media = |place: String, body: &Value| {
        let body = resolve(doc, body);
        if let Some(json) = body["content"].get("application/json") {
            out.push((place, json["schema"].clone(), json["example"].clone()));
        }
    };
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            if let Some(body) = op.get("requestBody") {
                media(format!("{method} {path} request"), body);
            }
            for (status, resp) in op["responses"].as_object().unwrap() {
                media(format!("{method} {path} {status}"), resp);
            }
        }
    }
    out
}

#[test]
fn every_json_body_in_the_openapi_document_has_an_example_of_its_shared_type() {
    let doc = spec();
    let all = examples(&doc);
    // Replies of list, create, show, start, stop, resources, log; the four
    // shared error replies as each route uses them; two request bodies.
    assert!(all.len() >= 20, "only {} JSON bodies found", all.len());
    let mut failures = Vec::new();
    for (place, schema, example) in &all {
        // A start's request body is an empty object with no example needed.
        if example.is_null() {
            if schema["additionalProperties"] == Value::Bool(false)
                && schema.get("properties").is_none()
            {
                continue;
            }
            failures.push(format!("{place}: no example"));
            continue;
        }
        if let Err(e) = check_against_schema(schema, example) {
            failures.push(format!("{place}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_example_with_a_renamed_field_is_refused() {
    let doc = spec();
    let (_, schema, mut example) = examples(&doc)
        .into_iter()
        .find(|(place, ..)| place == "get /v1/partitions/{name} 200")
        .unwrap();
    assert!(check_against_schema(&schema, &example).is_ok());
    let holdings = example["holdings"].as_object_mut().unwrap();
    let cpus = holdings.remove("cpus").unwrap();
    holdings.insert("cpu_list".into(), cpus);
    let e = check_against_schema(&schema, &example).unwrap_err();
    assert!(e.contains("cpus"), "{e}");
}
