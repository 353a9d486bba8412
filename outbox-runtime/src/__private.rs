//! Items used by the code that the derives generate. Not a public API: anything here may change
//! in any release.

pub use regex;
pub use schemars;
pub use serde;
pub use serde_json;
pub use std::sync::LazyLock;

use crate::service::{OutboxService, Rejection};

/// The rejection for an (event type, version) that matched no variant.
pub fn reject<S: OutboxService>(event_type: &str, version: u32) -> Rejection {
    let accepted = S::accepted_versions(event_type);
    if accepted.is_empty() {
        Rejection::UnknownEventType {
            service: S::SERVICE,
            event_type: event_type.to_owned(),
        }
    } else {
        Rejection::UnsupportedVersion {
            service: S::SERVICE,
            event_type: event_type.to_owned(),
            got: version,
            accepted,
        }
    }
}

/// Compiles a pattern the derive already checked; only the size limit can still fail.
pub fn compile_regex(pattern: &str) -> regex::Regex {
    match regex::Regex::new(pattern) {
        Ok(re) => re,
        Err(e) => panic!("outbox validation regex `{pattern}` cannot be compiled: {e}"),
    }
}

/// `&str` equality in const context.
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// True when `events[i]` repeats the (event type, version) of an earlier entry.
pub const fn repeats_earlier(events: &[(&str, u32)], i: usize) -> bool {
    let mut j = 0;
    while j < i {
        if events[j].1 == events[i].1 && str_eq(events[j].0, events[i].0) {
            return true;
        }
        j += 1;
    }
    false
}

/// A JSON value written into a schema by the derive.
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

/// Schema constraints per property: `(property, [(keyword, value)])`.
pub type Constraints = &'static [(&'static str, &'static [(&'static str, Json)])];

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

/// Adds the violations a struct-level `validate = path` function returned, under `path`.
pub fn merge(path: &str, result: Result<(), crate::Violations>, out: &mut crate::Violations) {
    if let Err(found) = result {
        for v in found {
            let p = if v.path.is_empty() {
                path.to_owned()
            } else {
                crate::validate::join(path, &v.path)
            };
            out.push(p, v.code, v.message);
        }
    }
}
