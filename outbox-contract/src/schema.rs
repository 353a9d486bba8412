//! Schema files and the compatibility gate.
//!
//! [`export`] writes one JSON Schema per (event type, version), `<dir>/<event_type>/v<N>.json`,
//! and an AsyncAPI 3.0 document, `<dir>/asyncapi.json`, whose channels are the services' topics
//! and whose messages are the events with their schemas and keys. Commit them; [`stale`] tells a
//! test when they no longer match the code.
//!
//! [`compare`] reads two such trees (say, the main branch's and a pull request's) and lists
//! every change to an existing (event type, version) that breaks its consumers or producers. A
//! new version is free; a new optional field is compatible. See [`Break`] for the rules.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::route::Catalog;

/// A JSON value written into a schema by the derive.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Json {
    /// A non-negative integer.
    U64(u64),
    /// An integer.
    I64(i64),
    /// A float.
    F64(f64),
    /// A string.
    Str(&'static str),
}

impl From<Json> for serde_json::Value {
    fn from(j: Json) -> Self {
        match j {
            Json::U64(v) => v.into(),
            Json::I64(v) => v.into(),
            Json::F64(v) => v.into(),
            Json::Str(v) => v.into(),
        }
    }
}

#[doc(hidden)]
/// Schema constraints per property: `(property, [(keyword, value)])`.
pub type Constraints = &'static [(&'static str, &'static [(&'static str, Json)])];

#[doc(hidden)]
/// Adds the constraints of `#[outbox(validate(...))]` to a property of a payload's schema.
pub fn constrain(schema: &mut schemars::Schema, property: &str, constraints: &[(&str, Json)]) {
    let Some(prop) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut(property))
        .and_then(|p| p.as_object_mut())
    else {
        return;
    };
    // A property given only as a `$ref` (a nested struct) keeps its own schema's constraints.
    if prop.contains_key("$ref") {
        return;
    }
    for (k, v) in constraints {
        prop.insert((*k).to_owned(), (*v).into());
    }
}

/// The files [`export`] writes, as `(path relative to the directory, content)`.
pub fn files(catalog: &Catalog) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut channels = serde_json::Map::new();
    let mut operations = serde_json::Map::new();
    let mut messages = serde_json::Map::new();
    for route in catalog.routes() {
        let schema = serde_json::to_value((route.spec.schema)()).unwrap_or(Value::Null);
        let path = PathBuf::from(route.event_type).join(format!("v{}.json", route.version));
        out.insert(path, pretty(&schema));
        let name = format!("{}.v{}", route.event_type, route.version);
        let mut message = json!({
            "name": route.event_type,
            "title": format!("{} v{}", route.event_type, route.version),
            "contentType": "application/json",
            "payload": { "$ref": format!("./{}/v{}.json", route.event_type, route.version) },
            "headers": {
                "type": "object",
                "properties": {
                    "traceparent": { "type": "string" },
                    "ce_id": { "type": "string" },
                    "ce_type": { "type": "string", "const": route.event_type },
                    "ce_source": { "type": "string" },
                    "ce_specversion": { "type": "string", "const": "1.0" },
                    "ce_time": { "type": "string", "format": "date-time" }
                }
            },
            "x-outbox-version": route.version,
            "x-outbox-service": route.route.service,
            "x-outbox-handler": route.spec.handler,
        });
        if let Some(key) = route.spec.key {
            message["bindings"] = json!({ "kafka": { "key": { "type": "string", "description": format!("from `{key}`") } } });
        }
        messages.insert(name.clone(), message);
        let channel = channels
            .entry(route.route.service.clone())
            .or_insert_with(|| {
                json!({
                    "address": route.route.topic,
                    "messages": {},
                    "x-outbox-table": route.route.table,
                    "x-outbox-group": route.route.group,
                })
            });
        channel["messages"][&name] = json!({ "$ref": format!("#/components/messages/{name}") });
    }
    for (service, channel) in &channels {
        let refs: Vec<Value> = channel["messages"]
            .as_object()
            .map(|m| {
                m.keys()
                    .map(|k| json!({ "$ref": format!("#/channels/{service}/messages/{k}") }))
                    .collect()
            })
            .unwrap_or_default();
        operations.insert(
            format!("consume-{service}"),
            json!({
                "action": "receive",
                "channel": { "$ref": format!("#/channels/{service}") },
                "messages": refs,
            }),
        );
    }
    let doc = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "outbox events",
            "version": "1",
            "description": "Generated from the event contracts by outbox_contract::schema::export; do not edit."
        },
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages },
    });
    out.insert(PathBuf::from("asyncapi.json"), pretty(&doc));
    out
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Writes every schema file under `dir` (creating it), removing `v<N>.json` files of events
/// that no longer exist. Returns the files written.
pub fn export(catalog: &Catalog, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let files = files(catalog);
    for (path, content) in &files {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&full, content)?;
    }
    for old in tree(dir)?.into_keys() {
        if !files.contains_key(&old) {
            std::fs::remove_file(dir.join(&old))?;
        }
    }
    Ok(files.into_keys().collect())
}

/// The files under `dir` that differ from what [`export`] would write (missing, changed or
/// extra), as relative paths; empty when the committed files are fresh.
pub fn stale(catalog: &Catalog, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let want = files(catalog);
    let have = tree(dir)?;
    let mut out: Vec<PathBuf> = want
        .iter()
        .filter(|(p, c)| have.get(*p) != Some(c))
        .map(|(p, _)| p.clone())
        .collect();
    out.extend(have.keys().filter(|p| !want.contains_key(*p)).cloned());
    out.sort();
    Ok(out)
}

/// Every `.json` file under `dir`, by relative path.
fn tree(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
                out.insert(rel, std::fs::read_to_string(&path)?);
            }
        }
    }
    Ok(out)
}

/// A change to an existing (event type, version) that breaks someone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The event type.
    pub event_type: String,
    /// The version.
    pub version: u32,
    /// Where, as a JSON path into the payload (`$.card.actions[*].url`).
    pub path: String,
    /// What changed, for a person.
    pub change: String,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} v{} at {}: {}",
            self.event_type, self.version, self.path, self.change
        )
    }
}

/// Every breaking change between the schema trees `base` and `head` (directories written by
/// [`export`]); versions only in `head` are new and free.
pub fn compare(base: &Path, head: &Path) -> std::io::Result<Vec<Break>> {
    let (base, head) = (tree(base)?, tree(head)?);
    let mut out = Vec::new();
    for (path, old) in &base {
        let Some((event_type, version)) = event_of(path) else {
            continue;
        };
        let (Ok(old), new) = (serde_json::from_str::<Value>(old), head.get(path)) else {
            continue;
        };
        let Some(new) = new else {
            out.push(Break {
                event_type,
                version,
                path: "$".into(),
                change: "the version was removed; consumers may still receive it".into(),
            });
            continue;
        };
        let new: Value = serde_json::from_str(new).unwrap_or(Value::Null);
        out.extend(
            compare_schemas(&old, &new)
                .into_iter()
                .map(|(path, change)| Break {
                    event_type: event_type.clone(),
                    version,
                    path,
                    change,
                }),
        );
    }
    Ok(out)
}

fn event_of(path: &Path) -> Option<(String, u32)> {
    let version = path
        .file_stem()?
        .to_str()?
        .strip_prefix('v')?
        .parse()
        .ok()?;
    let event_type = path.parent()?.to_str()?.to_owned();
    (!event_type.is_empty()).then_some((event_type, version))
}

/// The breaking differences between two versions of one payload's schema, as `(JSON path,
/// change)`.
///
/// Rules (a schema is a contract between producers and consumers of one version, so a change
/// must keep both old producers' payloads valid for new consumers and new producers' payloads
/// valid for old consumers):
/// - a field removed (or renamed: removed plus added) breaks old producers' readers;
/// - a type changed breaks both sides;
/// - an optional field made required, or a new required field, breaks old producers;
/// - a required field made optional breaks old consumers, which expect it;
/// - an enum that lost a value breaks old producers; one that gained a value breaks old
///   consumers, which cannot decode it;
/// - a tighter bound (`maxLength`, `maximum`, `pattern`, ...) breaks old producers;
/// - a new optional field, a looser bound, and a description are compatible.
pub fn compare_schemas(old: &Value, new: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    walk(old, old, new, new, "$", &mut out);
    out
}

/// Follows `{"$ref": "#/$defs/X"}` within its root schema.
fn resolve<'a>(root: &'a Value, v: &'a Value) -> &'a Value {
    let mut v = v;
    for _ in 0..32 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => match r.strip_prefix("#/").map(|p| p.split('/')) {
                Some(parts) => {
                    let mut target = root;
                    for part in parts {
                        target = match target.get(part) {
                            Some(t) => t,
                            None => return v,
                        };
                    }
                    v = target;
                }
                None => return v,
            },
            None => return v,
        }
    }
    v
}

/// The JSON types a schema allows (`"type": "x"` or `["x", "null"]`), sorted.
fn types(v: &Value) -> Vec<String> {
    let mut t: Vec<String> = match v.get("type") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    t.sort();
    t
}

/// The values an enum schema allows: `enum`, or `oneOf`/`anyOf` of `const`s (schemars' form for
/// documented variants).
fn enum_values(v: &Value) -> Option<Vec<Value>> {
    if let Some(Value::Array(e)) = v.get("enum") {
        return Some(e.clone());
    }
    let alts = v.get("oneOf").or_else(|| v.get("anyOf"))?.as_array()?;
    alts.iter()
        .map(|a| {
            a.get("const")
                .cloned()
                .or_else(|| a.get("enum")?.get(0).cloned())
        })
        .collect()
}

fn walk(
    old_root: &Value,
    old: &Value,
    new_root: &Value,
    new: &Value,
    path: &str,
    out: &mut Vec<(String, String)>,
) {
    let (old, new) = (resolve(old_root, old), resolve(new_root, new));
    let (ot, nt) = (types(old), types(new));
    if !ot.is_empty() && !nt.is_empty() && ot != nt {
        out.push((
            path.to_owned(),
            format!("type changed from {} to {}", ot.join("|"), nt.join("|")),
        ));
        return;
    }
    if let (Some(ov), Some(nv)) = (enum_values(old), enum_values(new)) {
        for v in ov.iter().filter(|v| !nv.contains(v)) {
            out.push((path.to_owned(), format!("enum value {v} was removed")));
        }
        for v in nv.iter().filter(|v| !ov.contains(v)) {
            out.push((
                path.to_owned(),
                format!("enum value {v} was added; old consumers cannot decode it"),
            ));
        }
    }
    bounds(old, new, path, out);
    // Objects: fields and required-ness.
    let empty = serde_json::Map::new();
    let oprops = old
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let nprops = new
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let req = |v: &Value| -> Vec<String> {
        v.get("required")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (oreq, nreq) = (req(old), req(new));
    for (name, oschema) in oprops {
        let p = format!("{path}.{name}");
        match nprops.get(name) {
            None => out.push((p, "field removed (or renamed)".into())),
            Some(nschema) => {
                let (was, is) = (oreq.contains(name), nreq.contains(name));
                if !was && is {
                    out.push((p.clone(), "optional field made required".into()));
                } else if was && !is {
                    out.push((
                        p.clone(),
                        "required field made optional; old consumers expect it".into(),
                    ));
                }
                walk(old_root, oschema, new_root, nschema, &p, out);
            }
        }
    }
    for name in nprops.keys().filter(|n| !oprops.contains_key(*n)) {
        if nreq.contains(name) {
            out.push((format!("{path}.{name}"), "new required field".into()));
        }
    }
    // Arrays: their items.
    if let (Some(oi), Some(ni)) = (old.get("items"), new.get("items")) {
        walk(old_root, oi, new_root, ni, &format!("{path}[*]"), out);
    }
}

/// Tighter bounds reject payloads that were valid.
fn bounds(old: &Value, new: &Value, path: &str, out: &mut Vec<(String, String)>) {
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    for (key, tighter_if_greater) in [
        ("minLength", true),
        ("minItems", true),
        ("minimum", true),
        ("exclusiveMinimum", true),
        ("maxLength", false),
        ("maxItems", false),
        ("maximum", false),
        ("exclusiveMaximum", false),
    ] {
        let tighter = match (num(old, key), num(new, key)) {
            (None, Some(_)) => true,
            (Some(o), Some(n)) => {
                if tighter_if_greater {
                    n > o
                } else {
                    n < o
                }
            }
            _ => false,
        };
        if tighter {
            out.push((
                path.to_owned(),
                format!(
                    "`{key}` tightened from {} to {}",
                    old.get(key).map_or("none".to_owned(), Value::to_string),
                    new.get(key).map_or("none".to_owned(), Value::to_string)
                ),
            ));
        }
    }
    if let Some(p) = new.get("pattern")
        && old.get("pattern") != Some(p)
    {
        out.push((path.to_owned(), format!("`pattern` changed to {p}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(props: Value, required: &[&str]) -> Value {
        json!({ "type": "object", "properties": props, "required": required })
    }

    /// Each row: a change, whether it breaks, and the path of the break.
    #[test]
    fn compatibility_rules() {
        let base = obj(
            json!({
                "user_id": { "type": "integer", "minimum": 1 },
                "text": { "type": "string", "maxLength": 100 },
                "note": { "type": ["string", "null"] },
                "kind": { "type": "string", "enum": ["a", "b"] },
                "tags": { "type": "array", "items": { "type": "string" } },
                "card": { "$ref": "#/$defs/Card" }
            }),
            &["user_id", "text", "kind", "tags", "card"],
        );
        let mut base = base;
        base["$defs"] =
            json!({ "Card": obj(json!({ "title": { "type": "string" } }), &["title"]) });

        type Edit = fn(&mut Value);
        let cases: Vec<(&str, Edit, Option<&str>)> = vec![
            ("nothing changed", |_| {}, None),
            (
                "a description added",
                |s| s["properties"]["text"]["description"] = json!("the text"),
                None,
            ),
            (
                "a new optional field",
                |s| s["properties"]["locale"] = json!({ "type": "string" }),
                None,
            ),
            (
                "a looser maxLength",
                |s| s["properties"]["text"]["maxLength"] = json!(200),
                None,
            ),
            (
                "a lower minimum",
                |s| s["properties"]["user_id"]["minimum"] = json!(0),
                None,
            ),
            (
                "a field removed",
                |s| {
                    s["properties"].as_object_mut().unwrap().remove("note");
                },
                Some("$.note"),
            ),
            (
                "a field renamed",
                |s| {
                    let v = s["properties"]
                        .as_object_mut()
                        .unwrap()
                        .remove("text")
                        .unwrap();
                    s["properties"]["body"] = v;
                    s["required"] = json!(["user_id", "body", "kind", "tags", "card"]);
                },
                Some("$.text"),
            ),
            (
                "a type changed",
                |s| s["properties"]["user_id"]["type"] = json!("string"),
                Some("$.user_id"),
            ),
            (
                "optional made required",
                |s| s["required"].as_array_mut().unwrap().push(json!("note")),
                Some("$.note"),
            ),
            (
                "required made optional",
                |s| s["required"] = json!(["user_id", "kind", "tags", "card"]),
                Some("$.text"),
            ),
            (
                "a new required field",
                |s| {
                    s["properties"]["locale"] = json!({ "type": "string" });
                    s["required"].as_array_mut().unwrap().push(json!("locale"));
                },
                Some("$.locale"),
            ),
            (
                "an enum narrowed",
                |s| s["properties"]["kind"]["enum"] = json!(["a"]),
                Some("$.kind"),
            ),
            (
                "an enum widened",
                |s| s["properties"]["kind"]["enum"] = json!(["a", "b", "c"]),
                Some("$.kind"),
            ),
            (
                "a tighter maxLength",
                |s| s["properties"]["text"]["maxLength"] = json!(50),
                Some("$.text"),
            ),
            (
                "a new pattern",
                |s| s["properties"]["text"]["pattern"] = json!("^x"),
                Some("$.text"),
            ),
            (
                "an array's item type changed",
                |s| s["properties"]["tags"]["items"]["type"] = json!("integer"),
                Some("$.tags[*]"),
            ),
            (
                "a nested field removed",
                |s| s["$defs"]["Card"]["properties"] = json!({}),
                Some("$.card.title"),
            ),
            (
                "nullable made non-null",
                |s| s["properties"]["note"]["type"] = json!("string"),
                Some("$.note"),
            ),
        ];
        assert!(cases.len() >= 15);
        for (what, edit, want) in cases {
            let mut head = base.clone();
            edit(&mut head);
            let breaks = compare_schemas(&base, &head);
            match want {
                None => assert!(breaks.is_empty(), "{what}: {breaks:?}"),
                Some(path) => assert!(
                    breaks.iter().any(|(p, _)| p == path),
                    "{what}: expected a break at {path}, got {breaks:?}"
                ),
            }
        }
    }
}
