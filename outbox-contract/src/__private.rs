//! Items used by the code that the derives generate. Not a public API: anything here may change
//! in any release.

pub use regex;
pub use schemars;
pub use serde;
pub use serde_json;
pub use std::sync::LazyLock;

pub use crate::constraint::{Constraint, Constraints, Json, Nested, NoRules, SchemaCx};
pub use crate::service::reject;
pub use crate::validate::NestedRules;

use crate::validate::{Violations, join};

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

/// Adds the violations a struct-level `validate = path` function returned, under `path`.
pub fn merge(path: &str, result: Result<(), Violations>, out: &mut Violations) {
    if let Err(found) = result {
        for v in found {
            let p = if v.path.is_empty() {
                path.to_owned()
            } else {
                join(path, &v.path)
            };
            out.push(p, v.code, v.message);
        }
    }
}
