//! Schema files and the compatibility gate.
//!
//! [`export`] writes one JSON Schema per (event type, version), `<dir>/<event_type>/v<N>.json`,
//! and an AsyncAPI 3.0 document, `<dir>/asyncapi.json`, whose channels are the services' topics
//! and whose messages are the events with their schemas and keys. Commit them; [`stale`] tells a
//! test when they no longer match the code.
//!
//! [`compare`] reads two such trees (say, the main branch's and a pull request's) and lists
//! every change to an existing (event type, version) that breaks its consumers or producers. A
//! new version is free; a new optional field is compatible. See [`compare_schemas`] for the
//! rules.
//!
//! Each schema carries the rules of `#[outbox(validate(...))]` that JSON Schema can state, each
//! as the keyword of the type it lands on: `length(max = 64)` is `maxLength` on a string and
//! `maxItems` on an array.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::constraint::{MAX_DEPTH, escape, own_types, tighten};
use crate::route::Catalog;

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
/// A schema is a contract between the producers and the consumers of one version: a change
/// must keep old producers' payloads valid for new consumers, and new producers' payloads
/// decodable by old consumers. So tightening a keyword (adding it, or moving a bound so that it
/// admits fewer values) breaks old producers, and loosening a validation keyword is accepted;
/// but a change to what a consumer decodes into breaks in both directions.
/// - a field removed (or renamed: removed plus added) breaks old producers' readers;
/// - a type changed (`type`, or the types of `anyOf`/`oneOf` branches) breaks both sides; so
///   does `null` added or removed, in `"type": [.., "null"]` or as an `anyOf`/`oneOf` branch
///   (`Option<T>`): old producers may send `null`, old consumers cannot decode it;
/// - an optional field made required, or a new required field, breaks old producers;
/// - a required field made optional breaks old consumers, which expect it;
/// - an `enum` or `const` added, or an enum value removed, breaks old producers; a value added,
///   or the `enum`/`const` removed, breaks old consumers, which cannot decode the new values;
/// - a bound tightened (`minLength`, `maxLength`, `minItems`, `maxItems`, `minProperties`,
///   `maxProperties`, `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`),
///   `multipleOf` added or changed to a step the old one is not a multiple of, `uniqueItems`
///   made true, or `additionalProperties` made false breaks old producers;
/// - `pattern` or `format` added breaks old producers; changed, it breaks as well, because
///   whether one pattern (or format) admits every value another did cannot be decided;
/// - under `additionalProperties: false`, a new optional field breaks old consumers, which
///   refuse fields they do not know;
/// - `items`, `prefixItems`, map values (`additionalProperties`, `patternProperties`) and
///   `$ref`s into `$defs` are compared by the same rules; a keyword written beside a `$ref`
///   counts as the target's;
/// - a new optional field, a looser bound, `pattern`, `format`, `multipleOf` or `uniqueItems`
///   removed, `additionalProperties` made true, and a description are compatible.
pub fn compare_schemas(old: &Value, new: &Value) -> Vec<(String, String)> {
    let mut gate = Gate {
        old_root: old,
        new_root: new,
        stack: Vec::new(),
        out: Vec::new(),
    };
    gate.walk(old, String::new(), new, String::new(), "$");
    gate.out
}

/// One comparison of two schema documents.
struct Gate<'a> {
    old_root: &'a Value,
    new_root: &'a Value,
    /// The pairs of schemas being compared, each side named by where it is (the last `$ref`
    /// followed, then the path below it): a recursive type comes round to a pair already on
    /// the stack, and stops there.
    stack: Vec<(String, String)>,
    out: Vec<(String, String)>,
}

/// The bounds, each with `true` when a greater value admits fewer values.
const BOUNDS: [(&str, bool); 10] = [
    ("minLength", true),
    ("minItems", true),
    ("minProperties", true),
    ("minimum", true),
    ("exclusiveMinimum", true),
    ("maxLength", false),
    ("maxItems", false),
    ("maxProperties", false),
    ("maximum", false),
    ("exclusiveMaximum", false),
];

impl<'a> Gate<'a> {
    fn push(&mut self, path: &str, change: impl Into<String>) {
        self.out.push((path.to_owned(), change.into()));
    }

    fn walk<'v>(
        &mut self,
        old: &'v Value,
        old_at: String,
        new: &'v Value,
        new_at: String,
        path: &str,
    ) where
        'a: 'v,
    {
        let (old, old_at) = follow(self.old_root, old, old_at);
        let (new, new_at) = follow(self.new_root, new, new_at);
        let (old_null, old, old_at) = split_null(self.old_root, old, old_at);
        let (new_null, new, new_at) = split_null(self.new_root, new, new_at);
        let here = (old_at, new_at);
        if self.stack.contains(&here) {
            return;
        }
        match (old_null, new_null) {
            (true, false) => self.push(path, "`null` no longer allowed; old producers may send it"),
            (false, true) => self.push(path, "`null` now allowed; old consumers cannot decode it"),
            _ => {}
        }
        let (ot, nt) = (
            type_set(self.old_root, &old, 0),
            type_set(self.new_root, &new, 0),
        );
        if ot != nt {
            let name = |t: &Option<BTreeSet<String>>| {
                t.as_ref().map_or("any".to_owned(), |t| {
                    t.iter().map(String::as_str).collect::<Vec<_>>().join("|")
                })
            };
            self.push(
                path,
                format!("type changed from {} to {}", name(&ot), name(&nt)),
            );
            return;
        }
        self.values(&old, &new, path);
        self.keywords(&old, &new, path);
        self.stack.push(here);
        let at = self.stack.last().cloned().unwrap_or_default();
        self.children(&old, &new, &at, path);
        self.stack.pop();
    }

    /// `enum` and `const`: the values a schema admits, when it lists them.
    fn values(&mut self, old: &Value, new: &Value, path: &str) {
        match (enum_values(old), enum_values(new)) {
            (Some(("const", ov)), Some(("const", nv))) => {
                if ov != nv {
                    self.push(path, format!("`const` changed from {} to {}", ov[0], nv[0]));
                }
            }
            (Some((_, ov)), Some((_, nv))) => {
                for v in ov.iter().filter(|v| !nv.contains(v)) {
                    self.push(path, format!("enum value {v} was removed"));
                }
                for v in nv.iter().filter(|v| !ov.contains(v)) {
                    self.push(
                        path,
                        format!("enum value {v} was added; old consumers cannot decode it"),
                    );
                }
            }
            (None, Some((kind, _))) => {
                self.push(path, format!("`{kind}` added; other values were valid"));
            }
            (Some((kind, _)), None) => self.push(
                path,
                format!("`{kind}` removed; old consumers cannot decode other values"),
            ),
            (None, None) => {}
        }
    }

    /// The keywords that constrain a value of the schema's own type.
    fn keywords(&mut self, old: &Value, new: &Value, path: &str) {
        let shown = |v: Option<&Value>| v.map_or("none".to_owned(), Value::to_string);
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
        for (key, tighter_if_greater) in BOUNDS {
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
                self.push(
                    path,
                    format!(
                        "`{key}` tightened from {} to {}",
                        shown(old.get(key)),
                        shown(new.get(key))
                    ),
                );
            }
        }
        // Every multiple of the old step is a multiple of the new one when the new step divides
        // the old: 4 → 2 is looser; 4 → 3, or none → 3, admits fewer values.
        if let Some(n) = num(new, "multipleOf") {
            let looser = num(old, "multipleOf").is_some_and(|o| n != 0.0 && (o / n).fract() == 0.0);
            if !looser {
                self.push(
                    path,
                    format!(
                        "`multipleOf` tightened from {} to {}",
                        shown(old.get("multipleOf")),
                        shown(new.get("multipleOf"))
                    ),
                );
            }
        }
        let unique = |v: &Value| v.get("uniqueItems") == Some(&Value::Bool(true));
        if unique(new) && !unique(old) {
            self.push(path, "`uniqueItems` tightened from false to true");
        }
        for key in ["pattern", "format"] {
            match (old.get(key), new.get(key)) {
                (None, Some(n)) => self.push(path, format!("`{key}` {n} added")),
                (Some(o), Some(n)) if o != n => self.push(
                    path,
                    format!(
                        "`{key}` changed from {o} to {n}; whether the new one admits every value the old one did cannot be decided, so any change breaks"
                    ),
                ),
                _ => {}
            }
        }
        let closed = |v: &Value| v.get("additionalProperties") == Some(&Value::Bool(false));
        if closed(new) && !closed(old) {
            let was = if old
                .get("additionalProperties")
                .is_some_and(Value::is_object)
            {
                "a schema"
            } else {
                "true"
            };
            self.push(
                path,
                format!("`additionalProperties` tightened from {was} to false"),
            );
        }
    }

    /// Fields, items and map values, compared by the same rules; `at` is where each side is.
    fn children<'v>(&mut self, old: &'v Value, new: &'v Value, at: &(String, String), path: &str)
    where
        'a: 'v,
    {
        let below = |rest: &str| (format!("{}/{rest}", at.0), format!("{}/{rest}", at.1));
        // Objects: fields and required-ness.
        let empty = serde_json::Map::new();
        let props = |v: &'v Value| v.get("properties").and_then(Value::as_object);
        let (oprops, nprops) = (props(old).unwrap_or(&empty), props(new).unwrap_or(&empty));
        let required = |v: &Value| -> Vec<String> {
            v.get("required")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (oreq, nreq) = (required(old), required(new));
        for (name, oschema) in oprops {
            let p = format!("{path}.{name}");
            let Some(nschema) = nprops.get(name) else {
                self.push(&p, "field removed (or renamed)");
                continue;
            };
            let (was, is) = (oreq.contains(name), nreq.contains(name));
            if !was && is {
                self.push(&p, "optional field made required");
            } else if was && !is {
                self.push(&p, "required field made optional; old consumers expect it");
            }
            let (o, n) = below(&format!("properties/{}", escape(name)));
            self.walk(oschema, o, nschema, n, &p);
        }
        let closed = old.get("additionalProperties") == Some(&Value::Bool(false));
        for name in nprops.keys().filter(|n| !oprops.contains_key(*n)) {
            let p = format!("{path}.{name}");
            if nreq.contains(name) {
                self.push(&p, "new required field");
            } else if closed {
                self.push(
                    &p,
                    "new field under `additionalProperties: false`; old consumers refuse it",
                );
            }
        }
        // Items and map values; an absent schema admits anything, as `true` does.
        let any = &Value::Bool(true);
        let sub = |v: &'v Value, k: &str| v.get(k).filter(|s| s.is_object() || s.is_boolean());
        if sub(old, "items").is_some() || sub(new, "items").is_some() {
            let (o, n) = below("items");
            let (oi, ni) = (
                sub(old, "items").unwrap_or(any),
                sub(new, "items").unwrap_or(any),
            );
            self.walk(oi, o, ni, n, &format!("{path}[*]"));
        }
        let tuple = |v: &'v Value| v.get("prefixItems").and_then(Value::as_array);
        let (ot, nt) = (tuple(old), tuple(new));
        for i in 0..ot.map_or(0, Vec::len).max(nt.map_or(0, Vec::len)) {
            let item = |t: Option<&'v Vec<Value>>| t.and_then(|t| t.get(i)).unwrap_or(any);
            let (o, n) = below(&format!("prefixItems/{i}"));
            self.walk(item(ot), o, item(nt), n, &format!("{path}[{i}]"));
        }
        // `false` on either side is judged in `keywords`: made false it breaks, made a schema
        // from false it is looser.
        let map = |v: &'v Value| v.get("additionalProperties").unwrap_or(any);
        let (om, nm) = (map(old), map(new));
        if (om.is_object() || nm.is_object())
            && om != &Value::Bool(false)
            && nm != &Value::Bool(false)
        {
            let (o, n) = below("additionalProperties");
            self.walk(om, o, nm, n, &format!("{path}.*"));
        }
        let patterns = |v: &'v Value| v.get("patternProperties").and_then(Value::as_object);
        let (op, np) = (
            patterns(old).unwrap_or(&empty),
            patterns(new).unwrap_or(&empty),
        );
        let keys: BTreeSet<&String> = op.keys().chain(np.keys()).collect();
        for key in keys {
            let (o, n) = below(&format!("patternProperties/{}", escape(key)));
            let (os, ns) = (op.get(key).unwrap_or(any), np.get(key).unwrap_or(any));
            self.walk(os, o, ns, n, &format!("{path}.*"));
        }
    }
}

/// Follows `$ref`s within `root`, and returns the schema they lead to, with the keywords
/// written beside each `$ref` laid over it (draft 2020-12 applies both), and where it is: the
/// last `$ref` followed, or `at` when there was none.
fn follow<'v>(root: &'v Value, v: &'v Value, at: String) -> (Cow<'v, Value>, String) {
    let mut chain = vec![v];
    let mut at = at;
    let mut node = v;
    for _ in 0..MAX_DEPTH {
        let Some(r) = node.get("$ref").and_then(Value::as_str) else {
            break;
        };
        let Some(target) = r.strip_prefix('#').and_then(|p| root.pointer(p)) else {
            break;
        };
        at = r.to_owned();
        node = target;
        chain.push(target);
    }
    let Some((&target, refs)) = chain.split_last() else {
        return (Cow::Borrowed(v), at);
    };
    if refs
        .iter()
        .all(|r| r.as_object().is_none_or(|m| m.len() == 1))
    {
        return (Cow::Borrowed(target), at);
    }
    let mut merged = match target {
        Value::Bool(true) => Value::Object(serde_json::Map::new()),
        other => other.clone(),
    };
    if let Value::Object(m) = &mut merged {
        for r in refs.iter().rev().filter_map(|r| r.as_object()) {
            for (k, v) in r.iter().filter(|(k, _)| *k != "$ref") {
                tighten(m, k, v.clone());
            }
        }
    }
    (Cow::Owned(merged), at)
}

/// Whether a schema admits `null` besides other values, and the schema of those other values:
/// `"type": ["string", "null"]`, or `anyOf`/`oneOf` with a `{"type": "null"}` branch (schemars'
/// `Option<T>` for a `T` behind a `$ref`), whose other branch is followed.
fn split_null<'v>(
    root: &'v Value,
    v: Cow<'v, Value>,
    at: String,
) -> (bool, Cow<'v, Value>, String) {
    let null = json!("null");
    let is_null = |b: &Value| b.get("type") == Some(&null);
    if let Some(Value::Array(t)) = v.get("type")
        && t.len() > 1
        && t.contains(&null)
    {
        let rest: Vec<Value> = t.iter().filter(|x| **x != null).cloned().collect();
        let mut inner = v.into_owned();
        inner["type"] = match <[Value; 1]>::try_from(rest) {
            Ok([one]) => one,
            Err(rest) => Value::Array(rest),
        };
        return (true, Cow::Owned(inner), at);
    }
    for key in ["anyOf", "oneOf"] {
        let Some(Value::Array(branches)) = v.get(key) else {
            continue;
        };
        if branches.len() < 2 || !branches.iter().any(is_null) {
            continue;
        }
        let rest: Vec<usize> = (0..branches.len())
            .filter(|&i| !is_null(&branches[i]))
            .collect();
        if let [i] = rest[..] {
            let at = format!("{at}/{key}/{i}");
            return match v {
                Cow::Borrowed(b) => {
                    let (inner, at) = follow(root, &b[key][i], at);
                    (true, inner, at)
                }
                Cow::Owned(o) => {
                    let (inner, at) = follow(root, &o[key][i], at);
                    (true, Cow::Owned(inner.into_owned()), at)
                }
            };
        }
        let kept: Vec<Value> = rest.iter().map(|&i| branches[i].clone()).collect();
        let mut inner = v.into_owned();
        inner[key] = Value::Array(kept);
        return (true, Cow::Owned(inner), at);
    }
    (false, v, at)
}

/// The JSON types a schema admits: its `type`, else the union of its `anyOf`/`oneOf` branches'
/// types, else the types of its `const` or `enum` values; `None` when that is not stated (any
/// value).
fn type_set(root: &Value, v: &Value, depth: u8) -> Option<BTreeSet<String>> {
    if depth >= MAX_DEPTH {
        return None;
    }
    if v.get("type").is_some() {
        return Some(own_types(v).into_iter().map(str::to_owned).collect());
    }
    if let Some(Value::Array(branches)) = v.get("anyOf").or_else(|| v.get("oneOf")) {
        let mut all = BTreeSet::new();
        for b in branches {
            let (b, _) = follow(root, b, String::new());
            all.extend(type_set(root, &b, depth + 1)?);
        }
        return Some(all);
    }
    let listed: Vec<&Value> = match (v.get("const"), v.get("enum")) {
        (Some(c), _) => vec![c],
        (None, Some(Value::Array(e))) => e.iter().collect(),
        _ => return None,
    };
    Some(
        listed
            .into_iter()
            .map(|x| json_type(x).to_owned())
            .collect(),
    )
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The values an enum schema admits, and the keyword that lists them: `enum`, `const`, or
/// `oneOf`/`anyOf` of `const`s (schemars' form for documented variants, named `enum` here).
fn enum_values(v: &Value) -> Option<(&'static str, Vec<Value>)> {
    if let Some(Value::Array(e)) = v.get("enum") {
        return Some(("enum", e.clone()));
    }
    if let Some(c) = v.get("const") {
        return Some(("const", vec![c.clone()]));
    }
    let alts = v.get("oneOf").or_else(|| v.get("anyOf"))?.as_array()?;
    let values = alts
        .iter()
        .map(|a| {
            a.get("const")
                .cloned()
                .or_else(|| a.get("enum")?.get(0).cloned())
        })
        .collect::<Option<Vec<Value>>>()?;
    Some(("enum", values))
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

    // One test per keyword the gate judges: tightening refused, loosening accepted, unchanged
    // passed; or, for what a consumer decodes into, refused both ways, as the rules say.

    /// An object whose one required property `f` has the schema `f`.
    fn with(f: Value) -> Value {
        json!({ "type": "object", "properties": { "f": f }, "required": ["f"] })
    }

    #[track_caller]
    fn breaks(base: &Value, head: &Value, path: &str, says: &str) {
        let found = compare_schemas(base, head);
        assert!(
            found.iter().any(|(p, c)| p == path && c.contains(says)),
            "expected a break at {path} saying {says:?}, got {found:?}"
        );
    }

    #[track_caller]
    fn passes(base: &Value, head: &Value) {
        assert_eq!(compare_schemas(base, head), Vec::<(String, String)>::new());
    }

    /// A bound on a schema of type `ty`: raised/lowered to `tighter` or added breaks; moved to
    /// `looser` or removed passes.
    #[track_caller]
    fn bound(ty: &str, key: &str, base: i64, tighter: i64, looser: i64) {
        let s = |v: i64| with(json!({ "type": ty, key: v }));
        let none = with(json!({ "type": ty }));
        let tightened = format!("`{key}` tightened from {base} to {tighter}");
        passes(&s(base), &s(base));
        breaks(&s(base), &s(tighter), "$.f", &tightened);
        breaks(
            &none,
            &s(base),
            "$.f",
            &format!("`{key}` tightened from none"),
        );
        passes(&s(base), &s(looser));
        passes(&s(base), &none);
    }

    #[test]
    fn gate_min_length() {
        bound("string", "minLength", 2, 3, 1);
    }

    #[test]
    fn gate_max_length() {
        bound("string", "maxLength", 10, 5, 20);
    }

    #[test]
    fn gate_min_items() {
        bound("array", "minItems", 2, 3, 1);
    }

    #[test]
    fn gate_max_items() {
        bound("array", "maxItems", 10, 5, 20);
    }

    #[test]
    fn gate_min_properties() {
        bound("object", "minProperties", 2, 3, 1);
    }

    #[test]
    fn gate_max_properties() {
        bound("object", "maxProperties", 10, 5, 20);
    }

    #[test]
    fn gate_minimum() {
        bound("integer", "minimum", 1, 2, 0);
    }

    #[test]
    fn gate_maximum() {
        bound("integer", "maximum", 100, 99, 101);
    }

    #[test]
    fn gate_exclusive_minimum() {
        bound("number", "exclusiveMinimum", 0, 1, -1);
    }

    #[test]
    fn gate_exclusive_maximum() {
        bound("number", "exclusiveMaximum", 10, 9, 11);
    }

    #[test]
    fn gate_multiple_of() {
        let s = |v: u64| with(json!({ "type": "integer", "multipleOf": v }));
        let none = with(json!({ "type": "integer" }));
        passes(&s(4), &s(4));
        // 4 → 3 and 4 → 8 each refuse some multiples of 4 (4 itself, 12).
        breaks(&s(4), &s(3), "$.f", "`multipleOf` tightened from 4 to 3");
        breaks(&s(4), &s(8), "$.f", "`multipleOf` tightened from 4 to 8");
        breaks(&none, &s(4), "$.f", "`multipleOf` tightened from none to 4");
        // Every multiple of 4 is a multiple of 2.
        passes(&s(4), &s(2));
        passes(&s(4), &none);
    }

    #[test]
    fn gate_unique_items() {
        let s = |v: bool| with(json!({ "type": "array", "uniqueItems": v }));
        let none = with(json!({ "type": "array" }));
        passes(&s(true), &s(true));
        breaks(&s(false), &s(true), "$.f", "`uniqueItems` tightened");
        breaks(&none, &s(true), "$.f", "`uniqueItems` tightened");
        passes(&s(true), &s(false));
        passes(&s(true), &none);
    }

    /// `pattern` and `format`: added breaks; changed breaks, because no one can tell whether the
    /// new one admits every value the old one did; removed passes.
    #[track_caller]
    fn undecidable(key: &str, base: &str, other: &str) {
        let s = |v: &str| with(json!({ "type": "string", key: v }));
        let none = with(json!({ "type": "string" }));
        passes(&s(base), &s(base));
        breaks(&none, &s(base), "$.f", &format!("`{key}` \"{base}\" added"));
        breaks(
            &s(base),
            &s(other),
            "$.f",
            "cannot be decided, so any change breaks",
        );
        passes(&s(base), &none);
    }

    #[test]
    fn gate_pattern() {
        // `^a+$` → `^a*$` is looser, but the gate cannot know that: any change breaks.
        undecidable("pattern", "^a+$", "^a*$");
    }

    #[test]
    fn gate_format() {
        undecidable("format", "date-time", "date");
    }

    #[test]
    fn gate_enum() {
        let s = |v: Value| with(json!({ "type": "string", "enum": v }));
        let none = with(json!({ "type": "string" }));
        let base = s(json!(["a", "b"]));
        passes(&base, &base);
        breaks(
            &base,
            &s(json!(["a"])),
            "$.f",
            "enum value \"b\" was removed",
        );
        breaks(&none, &base, "$.f", "`enum` added; other values were valid");
        // Loosening is refused too: old consumers decode into an enum without the new value.
        breaks(
            &base,
            &s(json!(["a", "b", "c"])),
            "$.f",
            "enum value \"c\" was added; old consumers cannot decode it",
        );
        breaks(
            &base,
            &none,
            "$.f",
            "`enum` removed; old consumers cannot decode other values",
        );
        // schemars' form for documented variants is the same enum.
        let documented = with(json!({ "oneOf": [
            { "type": "string", "const": "a", "description": "A." },
            { "type": "string", "enum": ["b"] }
        ] }));
        passes(&base, &documented);
    }

    #[test]
    fn gate_const() {
        let s = |v: &str| with(json!({ "type": "string", "const": v }));
        let none = with(json!({ "type": "string" }));
        passes(&s("a"), &s("a"));
        breaks(
            &none,
            &s("a"),
            "$.f",
            "`const` added; other values were valid",
        );
        breaks(
            &s("a"),
            &s("b"),
            "$.f",
            "`const` changed from \"a\" to \"b\"",
        );
        // As for an enum, other values are new values to old consumers.
        breaks(
            &s("a"),
            &none,
            "$.f",
            "`const` removed; old consumers cannot decode other values",
        );
    }

    #[test]
    fn gate_type() {
        let s = |t: Value| with(json!({ "type": t }));
        passes(&s(json!(["string", "null"])), &s(json!(["null", "string"])));
        breaks(
            &s(json!("integer")),
            &s(json!("string")),
            "$.f",
            "type changed from integer to string",
        );
        breaks(
            &s(json!("integer")),
            &s(json!("number")),
            "$.f",
            "type changed from integer to number",
        );
        breaks(
            &with(json!({})),
            &s(json!("string")),
            "$.f",
            "type changed from any to string",
        );
        breaks(
            &s(json!("string")),
            &with(json!({})),
            "$.f",
            "type changed from string to any",
        );
        breaks(
            &s(json!(["string", "null"])),
            &s(json!("string")),
            "$.f",
            "`null` no longer allowed; old producers may send it",
        );
        // Loosening is refused too: an old consumer's `String` cannot decode `null`.
        breaks(
            &s(json!("string")),
            &s(json!(["string", "null"])),
            "$.f",
            "`null` now allowed; old consumers cannot decode it",
        );
    }

    #[test]
    fn gate_nullable_through_any_of() {
        let defs = json!({ "Card": {
            "type": "object",
            "properties": { "title": { "type": "string", "maxLength": 10 } },
            "required": ["title"]
        } });
        let doc = |f: Value, max: u64| {
            let mut d = with(f);
            d["$defs"] = defs.clone();
            d["$defs"]["Card"]["properties"]["title"]["maxLength"] = json!(max);
            d
        };
        let card = json!({ "$ref": "#/$defs/Card" });
        let optional = json!({ "anyOf": [{ "$ref": "#/$defs/Card" }, { "type": "null" }] });
        let one_of = json!({ "oneOf": [{ "type": "null" }, { "$ref": "#/$defs/Card" }] });
        passes(&doc(optional.clone(), 10), &doc(optional.clone(), 10));
        passes(&doc(optional.clone(), 10), &doc(one_of.clone(), 10));
        breaks(
            &doc(optional.clone(), 10),
            &doc(card.clone(), 10),
            "$.f",
            "`null` no longer allowed",
        );
        breaks(
            &doc(card.clone(), 10),
            &doc(optional.clone(), 10),
            "$.f",
            "`null` now allowed",
        );
        // The branch that is not null is compared like any schema.
        breaks(
            &doc(optional.clone(), 10),
            &doc(optional.clone(), 5),
            "$.f.title",
            "`maxLength` tightened from 10 to 5",
        );
        passes(&doc(optional.clone(), 10), &doc(one_of, 20));
        // `Option<String>` in either form is the same schema.
        let typed = with(json!({ "type": ["string", "null"], "maxLength": 3 }));
        let branches =
            with(json!({ "anyOf": [{ "type": "string", "maxLength": 3 }, { "type": "null" }] }));
        passes(&typed, &branches);
        passes(&branches, &typed);
    }

    #[test]
    fn gate_required() {
        let base = obj(
            json!({ "a": { "type": "string" }, "b": { "type": "string" } }),
            &["a"],
        );
        passes(&base, &base);
        breaks(
            &base,
            &obj(
                json!({ "a": { "type": "string" }, "b": { "type": "string" } }),
                &["a", "b"],
            ),
            "$.b",
            "optional field made required",
        );
        breaks(
            &base,
            &obj(
                json!({ "a": { "type": "string" }, "b": { "type": "string" }, "c": { "type": "string" } }),
                &["a", "c"],
            ),
            "$.c",
            "new required field",
        );
        // Loosening is refused too: old consumers expect the field.
        breaks(
            &base,
            &obj(
                json!({ "a": { "type": "string" }, "b": { "type": "string" } }),
                &[],
            ),
            "$.a",
            "required field made optional; old consumers expect it",
        );
        passes(
            &base,
            &obj(
                json!({ "a": { "type": "string" }, "b": { "type": "string" }, "c": { "type": "string" } }),
                &["a"],
            ),
        );
        breaks(
            &base,
            &obj(json!({ "b": { "type": "string" } }), &[]),
            "$.a",
            "field removed (or renamed)",
        );
    }

    #[test]
    fn gate_additional_properties() {
        let s = |v: Value| {
            let mut o = obj(json!({ "a": { "type": "string" } }), &["a"]);
            o["additionalProperties"] = v;
            o
        };
        let open = obj(json!({ "a": { "type": "string" } }), &["a"]);
        passes(&s(json!(false)), &s(json!(false)));
        breaks(
            &open,
            &s(json!(false)),
            "$",
            "`additionalProperties` tightened from true to false",
        );
        breaks(
            &s(json!(true)),
            &s(json!(false)),
            "$",
            "`additionalProperties` tightened from true to false",
        );
        breaks(
            &s(json!({ "type": "integer" })),
            &s(json!(false)),
            "$",
            "`additionalProperties` tightened from a schema to false",
        );
        passes(&s(json!(false)), &s(json!(true)));
        passes(&s(json!(false)), &open);
        passes(&s(json!(false)), &s(json!({ "type": "integer" })));
        // Old consumers that refuse unknown fields refuse a new optional one.
        let mut grown = s(json!(false));
        grown["properties"]["b"] = json!({ "type": "string" });
        breaks(
            &s(json!(false)),
            &grown,
            "$.b",
            "new field under `additionalProperties: false`",
        );
        let mut grown_open = open.clone();
        grown_open["properties"]["b"] = json!({ "type": "string" });
        passes(&open, &grown_open);
        // A map's values are compared like any schema.
        let map = |max: u64| {
            with(
                json!({ "type": "object", "additionalProperties": { "type": "integer", "maximum": max } }),
            )
        };
        passes(&map(10), &map(10));
        breaks(
            &map(10),
            &map(5),
            "$.f.*",
            "`maximum` tightened from 10 to 5",
        );
        passes(&map(10), &map(20));
        let keyed = |max: u64| {
            with(
                json!({ "type": "object", "patternProperties": { "^\\d+$": { "type": "integer", "maximum": max } } }),
            )
        };
        breaks(
            &keyed(10),
            &keyed(5),
            "$.f.*",
            "`maximum` tightened from 10 to 5",
        );
        passes(&keyed(10), &keyed(20));
    }

    #[test]
    fn gate_items() {
        let s = |item: Value| with(json!({ "type": "array", "items": item }));
        let min = |m: u64| s(json!({ "type": "integer", "minimum": m }));
        passes(&min(1), &min(1));
        breaks(
            &min(1),
            &min(2),
            "$.f[*]",
            "`minimum` tightened from 1 to 2",
        );
        passes(&min(1), &min(0));
        breaks(
            &min(1),
            &s(json!({ "type": "string" })),
            "$.f[*]",
            "type changed from integer to string",
        );
        // A tuple's positions.
        let pair = |m: u64| {
            with(
                json!({ "type": "array", "prefixItems": [{ "type": "integer", "minimum": m }, { "type": "string" }] }),
            )
        };
        breaks(
            &pair(1),
            &pair(2),
            "$.f[0]",
            "`minimum` tightened from 1 to 2",
        );
        passes(&pair(1), &pair(0));
    }

    #[test]
    fn gate_refs_and_defs() {
        let doc = |max: u64, beside: bool| {
            let mut d = obj(json!({ "card": { "$ref": "#/$defs/Card" } }), &["card"]);
            d["$defs"] =
                json!({ "Card": obj(json!({ "title": { "type": "string" } }), &["title"]) });
            let at = if beside {
                &mut d["properties"]["card"]
            } else {
                &mut d["$defs"]["Card"]
            };
            at["maxProperties"] = json!(max);
            d
        };
        passes(&doc(3, false), &doc(3, false));
        breaks(
            &doc(3, false),
            &doc(2, false),
            "$.card",
            "`maxProperties` tightened from 3 to 2",
        );
        passes(&doc(3, false), &doc(4, false));
        // A keyword beside a `$ref` applies with the target: moving it there changes nothing,
        // tightening it there breaks.
        passes(&doc(3, false), &doc(3, true));
        breaks(
            &doc(3, false),
            &doc(2, true),
            "$.card",
            "`maxProperties` tightened from 3 to 2",
        );
        // Inside `$defs`.
        let mut head = doc(3, false);
        head["$defs"]["Card"]["properties"]["title"]["maxLength"] = json!(5);
        breaks(
            &doc(3, false),
            &head,
            "$.card.title",
            "`maxLength` tightened from none to 5",
        );
        // A recursive type is walked once round, and its changes found.
        let tree = |max: u64| {
            let node = obj(
                json!({
                    "name": { "type": "string", "maxLength": max },
                    "children": { "type": "array", "items": { "$ref": "#/$defs/Node" } },
                    "parent": { "anyOf": [{ "$ref": "#/$defs/Node" }, { "type": "null" }] }
                }),
                &["name", "children"],
            );
            let mut d = obj(json!({ "root": { "$ref": "#/$defs/Node" } }), &["root"]);
            d["$defs"] = json!({ "Node": node });
            d
        };
        passes(&tree(4), &tree(4));
        passes(&tree(4), &tree(5));
        let found = compare_schemas(&tree(4), &tree(3));
        assert_eq!(
            found,
            [(
                "$.root.name".to_owned(),
                "`maxLength` tightened from 4 to 3".to_owned()
            )]
        );
    }
}
