//! Attribute names, one constant each, so a typo in the macro is a compile error.

pub(crate) const OUTBOX: &str = "outbox";

pub(crate) const EVENT_TYPE: &str = "event_type";
pub(crate) const VERSION: &str = "version";
pub(crate) const SERVICE: &str = "service";
pub(crate) const KEY: &str = "key";
pub(crate) const AGGREGATE: &str = "aggregate";
pub(crate) const VALIDATE: &str = "validate";
pub(crate) const CRATE: &str = "crate";

pub(crate) const TABLE: &str = "table";
pub(crate) const TOPIC: &str = "topic";
pub(crate) const GROUP: &str = "group";
pub(crate) const HANDLER: &str = "handler";

pub(crate) const NON_EMPTY: &str = "non_empty";
pub(crate) const LENGTH: &str = "length";
pub(crate) const RANGE: &str = "range";
pub(crate) const REGEX: &str = "regex";
pub(crate) const CUSTOM: &str = "custom";
pub(crate) const NESTED: &str = "nested";
pub(crate) const MIN: &str = "min";
pub(crate) const MAX: &str = "max";

/// The keys of `#[outbox(...)]` on an event struct.
pub(crate) const EVENT_KEYS: &[&str] = &[
    EVENT_TYPE, VERSION, SERVICE, KEY, AGGREGATE, VALIDATE, CRATE,
];
/// The keys of `#[outbox(...)]` on a struct deriving only `Validate`.
pub(crate) const VALIDATE_KEYS: &[&str] = &[VALIDATE, CRATE];
/// The keys of `#[outbox(...)]` on a field.
pub(crate) const FIELD_KEYS: &[&str] = &[VALIDATE];
/// The rules inside `#[outbox(validate(...))]` on a field.
pub(crate) const RULES: &[&str] = &[NON_EMPTY, LENGTH, RANGE, REGEX, CUSTOM, NESTED];
/// The keys of `#[outbox(...)]` on a service enum.
pub(crate) const SERVICE_KEYS: &[&str] = &[SERVICE, TABLE, TOPIC, GROUP, HANDLER, CRATE];
/// The keys of `#[outbox(...)]` on a service enum's variant.
pub(crate) const VARIANT_KEYS: &[&str] = &[HANDLER];

/// "`a`, `b` or `c`", for error messages.
pub(crate) fn one_of(keys: &[&str]) -> String {
    let quoted: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}
