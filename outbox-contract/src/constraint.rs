//! The rules of `#[outbox(validate(...))]` as JSON Schema keywords.
//!
//! Each schema carries the rules that JSON Schema can state, on every level the validator
//! checks (the payload's fields, and the fields of the types its `nested` fields reach, in their
//! `$defs` entries), each as the keyword of the type it lands on: `length(max = 64)` is
//! `maxLength` on a string and `maxItems` on an array. The derives name the rule
//! ([`Constraint`]); [`SchemaCx`] picks the keyword from the schema it writes into. Everything
//! here is for generated code.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde_json::Value;

/// A JSON value written into a schema by the derive.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
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

/// A rule of `#[outbox(validate(...))]` that JSON Schema can state.
///
/// The derive sees a field's tokens, not its type, so it names the rule and [`SchemaCx`] picks
/// the keyword from the `type` of the schema it lands on: `length(max = 64)` is `maxLength` on
/// a string, `maxItems` on an array, `maxProperties` on an object, and nothing on a number.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Constraint {
    /// `length(min = ..)`, or `non_empty`: at least this many characters, items or entries.
    MinSize(u64),
    /// `length(max = ..)`: at most this many characters, items or entries.
    MaxSize(u64),
    /// `non_empty` on a string without `regex`: not blank, `"pattern": "\\S"`.
    NotBlank,
    /// `regex = ".."`, anchored by the derive.
    Pattern(&'static str),
    /// `range(min = ..)`.
    Minimum(Json),
    /// `range(max = ..)`.
    Maximum(Json),
}

impl Constraint {
    /// The keyword and value that state this rule on a schema of JSON type `ty`; `None` when
    /// the rule says nothing about values of that type (a size on a number, a pattern on an
    /// array, anything on `null`).
    fn keyword(self, ty: &str) -> Option<(&'static str, Value)> {
        use Constraint::*;
        Some(match (self, ty) {
            (MinSize(n), "string") => ("minLength", n.into()),
            (MinSize(n), "array") => ("minItems", n.into()),
            (MinSize(n), "object") => ("minProperties", n.into()),
            (MaxSize(n), "string") => ("maxLength", n.into()),
            (MaxSize(n), "array") => ("maxItems", n.into()),
            (MaxSize(n), "object") => ("maxProperties", n.into()),
            (NotBlank, "string") => ("pattern", "\\S".into()),
            (Pattern(p), "string") => ("pattern", p.into()),
            (Minimum(j), "integer" | "number") => ("minimum", j.into()),
            (Maximum(j), "integer" | "number") => ("maximum", j.into()),
            _ => return None,
        })
    }
}

/// The constraints of one type's fields: `(property, [constraint])`.
#[doc(hidden)]
pub type Constraints = &'static [(&'static str, &'static [Constraint])];

/// A schema being given the rules of `#[outbox(validate(...))]`: the code `#[derive(Validate)]`
/// and `#[derive(OutboxEvent)]` generate in `Validate::__outbox_schema` writes each type's
/// rules into the schema of that type, found by a JSON pointer (`/$defs/Card`) that follows the
/// payload's shape: a property, an array's `items`, a map's `additionalProperties`, a `$ref`
/// into `$defs`, each branch of an `anyOf` (an `Option`).
#[doc(hidden)]
#[derive(Debug)]
pub struct SchemaCx<'a> {
    root: &'a mut Value,
    /// `(type, object schema)` pairs already written: a `$defs` entry reached twice is written
    /// once, and a recursive type (`Vec<Node>` in `Node`) ends.
    done: HashSet<(&'static str, String)>,
}

impl<'a> SchemaCx<'a> {
    /// Rules will be written into `root`, a whole schema document.
    pub fn new(root: &'a mut Value) -> Self {
        Self {
            root,
            done: HashSet::new(),
        }
    }

    /// Writes `fields` into the properties of each object schema at `at` that has not had
    /// `T`'s rules yet, and returns those objects' pointers, for the nested fields.
    pub fn object<T: ?Sized>(&mut self, at: &str, fields: Constraints) -> Vec<String> {
        let mut objects = Vec::new();
        reach(self.root, at, 0, &mut |root, p| {
            if root
                .pointer(p)
                .is_some_and(|n| own_types(n).contains(&"object"))
            {
                objects.push(p.to_owned());
            }
        });
        objects.retain(|o| self.done.insert((std::any::type_name::<T>(), o.clone())));
        for object in &objects {
            for (property, constraints) in fields {
                write(self.root, &property_at(object, property), constraints, 0);
            }
        }
        objects
    }

    /// Where a `nested` field's schema is: the property `name` of the object at `object`, or,
    /// for a `#[serde(flatten)]` field (`None`), that object, which holds the flattened fields.
    pub fn at(object: &str, name: Option<&str>) -> String {
        name.map_or_else(|| object.to_owned(), |n| property_at(object, n))
    }

    /// The schemas of the items of the arrays at `at`: where `Vec<T>`'s `T` is described.
    pub fn items(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        reach(self.root, at, 0, &mut |root, p| {
            if root.pointer(p).and_then(|n| n.get("items")).is_some() {
                out.push(format!("{p}/items"));
            }
        });
        out
    }

    /// The schemas of the values of the maps at `at`: where `BTreeMap<K, V>`'s `V` is
    /// described (`additionalProperties`, or `patternProperties` for integer keys).
    pub fn values(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        reach(self.root, at, 0, &mut |root, p| {
            let Some(node) = root.pointer(p) else { return };
            if node
                .get("additionalProperties")
                .is_some_and(Value::is_object)
            {
                out.push(format!("{p}/additionalProperties"));
            }
            if let Some(Value::Object(patterns)) = node.get("patternProperties") {
                for key in patterns.keys() {
                    out.push(format!("{p}/patternProperties/{}", escape(key)));
                }
            }
        });
        out
    }
}

/// The type of a `nested` field, named by a closure that reads the field. Generated code calls
/// `(&Nested::of(..)).__outbox_schema_of(cx, at)`: for a `Validate` type, method lookup finds
/// [`NestedRules`](crate::validate::NestedRules), which writes the type's rules; for any other
/// type, it falls back to [`NoRules`], which writes nothing, because the field's
/// `validate_into` call already reports the missing `Validate`, and one mistake should give one
/// error.
#[doc(hidden)]
pub struct Nested<T>(PhantomData<fn() -> T>);

impl<T> Nested<T> {
    /// The type that `field` returns.
    pub fn of<S: ?Sized>(_field: fn(&S) -> &T) -> Self {
        Self(PhantomData)
    }
}

impl<T> fmt::Debug for Nested<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::any::type_name::<Self>())
    }
}

/// See [`Nested`].
#[doc(hidden)]
pub trait NoRules {
    /// Writes nothing.
    fn __outbox_schema_of(&self, cx: &mut SchemaCx<'_>, at: &str);
}

impl<T> NoRules for &Nested<T> {
    fn __outbox_schema_of(&self, _: &mut SchemaCx<'_>, _: &str) {}
}

/// `$defs` chains and nesting are short; a longer chain is a cycle of `$ref`s.
pub(crate) const MAX_DEPTH: u8 = 32;

/// Calls `f` with each schema the value at `at` can take: itself, the target of its `$ref`,
/// and each branch of its `anyOf`/`oneOf`/`allOf`, recursively.
fn reach(root: &Value, at: &str, depth: u8, f: &mut dyn FnMut(&Value, &str)) {
    let Some(node) = root.pointer(at).filter(|_| depth < MAX_DEPTH) else {
        return;
    };
    if let Some(target) = local_ref(node) {
        reach(root, &target, depth + 1, f);
        return;
    }
    f(root, at);
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(branches)) = node.get(key) {
            for i in 0..branches.len() {
                reach(root, &format!("{at}/{key}/{i}"), depth + 1, f);
            }
        }
    }
}

/// The types a schema states itself, in `type`.
pub(crate) fn own_types(node: &Value) -> Vec<&str> {
    match node.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(t)) => t.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// The JSON pointer a local `$ref` (`#/$defs/Card`) names.
fn local_ref(node: &Value) -> Option<String> {
    let r = node.get("$ref")?.as_str()?;
    r.strip_prefix('#').map(str::to_owned)
}

fn property_at(object: &str, name: &str) -> String {
    format!("{object}/properties/{}", escape(name))
}

/// A name as one JSON pointer segment.
pub(crate) fn escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// The JSON types the schema at `at` allows: its `type`, its `$ref` target's, or the union of
/// its `anyOf`/`oneOf` branches'. `None` when that is not stated: a schema with no `type`
/// (`serde_json::Value`'s is `true`) takes any JSON value.
fn types_at(root: &Value, at: &str, depth: u8) -> Option<Vec<String>> {
    let node = root.pointer(at).filter(|_| depth < MAX_DEPTH)?;
    if node.get("type").is_some() {
        return Some(own_types(node).into_iter().map(str::to_owned).collect());
    }
    if let Some(target) = local_ref(node) {
        return types_at(root, &target, depth + 1);
    }
    let key = ["anyOf", "oneOf"]
        .into_iter()
        .find(|k| node.get(k).is_some())?;
    let n = node.get(key)?.as_array()?.len();
    let mut all = Vec::new();
    for i in 0..n {
        for t in types_at(root, &format!("{at}/{key}/{i}"), depth + 1)? {
            if !all.contains(&t) {
                all.push(t);
            }
        }
    }
    Some(all)
}

/// Writes a field's constraints into the property schema at `at`, each as the keyword of the
/// type found there:
/// - `"type": "string"` or `["string", "null"]` (an `Option`): the keywords of `string`;
/// - a `$ref` (a struct, an enum, a newtype): the keywords of its target's type, beside the
///   `$ref` (draft 2020-12 applies both), so the constraint holds here and not at every other
///   use of the target;
/// - `anyOf`/`oneOf` with no `type` (`Option<Struct>`, `Option<Enum>`): into each branch, so
///   the `null` branch gets nothing;
/// - no `type` at all (`serde_json::Value`): nothing, as any keyword written there would fit
///   some values and not others, and readers of the schema could not tell which type it meant.
fn write(root: &mut Value, at: &str, constraints: &[Constraint], depth: u8) {
    let Some(node) = root.pointer(at).filter(|_| depth < MAX_DEPTH) else {
        return;
    };
    let branches = ["anyOf", "oneOf"].into_iter().find_map(|k| {
        let n = node.get(k)?.as_array()?.len();
        Some((k, n))
    });
    let types = if node.get("type").is_some() || node.get("$ref").is_some() {
        types_at(root, at, depth)
    } else {
        None
    };
    if let Some(types) = types {
        let Some(Value::Object(node)) = root.pointer_mut(at) else {
            return;
        };
        for ty in &types {
            for c in constraints {
                if let Some((key, value)) = c.keyword(ty) {
                    tighten(node, key, value);
                }
            }
        }
    } else if let Some((key, n)) = branches {
        for i in 0..n {
            write(root, &format!("{at}/{key}/{i}"), constraints, depth + 1);
        }
    }
}

/// Sets `key`, keeping the tighter of an existing bound and the new one: schemars already
/// writes some (`"minimum": 0` for a `u64`, `"maxItems": 2` for a `[T; 2]`), and a value must
/// meet both the type's and the rule's.
pub(crate) fn tighten(node: &mut serde_json::Map<String, Value>, key: &str, value: Value) {
    let keep_old = match (node.get(key).and_then(Value::as_f64), value.as_f64()) {
        (Some(old), Some(new)) if key.starts_with("min") => old >= new,
        (Some(old), Some(new)) if key.starts_with("max") => old <= new,
        _ => false,
    };
    if !keep_old {
        node.insert(key.to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A rule is written as the keyword of the type it lands on, and not at all where the type
    /// says nothing (a number, `null`, a schema with no type).
    #[test]
    fn constraints_take_the_keyword_of_the_type_they_land_on() {
        let mut doc = json!({
            "type": "object",
            "properties": {
                "s": { "type": ["string", "null"] },
                "a": { "type": "array", "items": { "type": "string" } },
                "m": { "type": "object", "additionalProperties": { "type": "integer" } },
                "n": { "type": "integer", "minimum": 0, "maximum": 255 },
                "r": { "$ref": "#/$defs/Code" },
                "o": { "anyOf": [{ "$ref": "#/$defs/Code" }, { "type": "null" }] },
                "v": true,
                "u": {}
            },
            "$defs": { "Code": { "type": "string" } }
        });
        let size = [
            Constraint::MinSize(1),
            Constraint::MaxSize(9),
            Constraint::NotBlank,
        ];
        let range = [
            Constraint::Minimum(Json::I64(-5)),
            Constraint::Maximum(Json::U64(300)),
        ];
        let fields: Constraints = &[];
        let mut cx = SchemaCx::new(&mut doc);
        assert_eq!(cx.object::<()>("", fields), [""]);
        assert!(
            cx.object::<()>("", fields).is_empty(),
            "written once per type"
        );
        for p in ["s", "a", "m", "r", "o", "v", "u"] {
            write(cx.root, &property_at("", p), &size, 0);
            write(cx.root, &property_at("", p), &range, 0);
        }
        write(cx.root, "/properties/n", &range, 0);
        let props = &doc["properties"];
        assert_eq!(
            props["s"],
            json!({ "type": ["string", "null"], "minLength": 1, "maxLength": 9, "pattern": "\\S" })
        );
        assert_eq!(
            props["a"],
            json!({ "type": "array", "items": { "type": "string" }, "minItems": 1, "maxItems": 9 })
        );
        assert_eq!(props["m"]["minProperties"], json!(1));
        assert_eq!(props["m"]["maxProperties"], json!(9));
        assert!(props["m"].get("pattern").is_none());
        // The tighter of the type's bound and the rule's.
        assert_eq!(
            props["n"],
            json!({ "type": "integer", "minimum": 0, "maximum": 255 })
        );
        assert_eq!(
            props["r"],
            json!({ "$ref": "#/$defs/Code", "minLength": 1, "maxLength": 9, "pattern": "\\S" })
        );
        assert_eq!(props["o"]["anyOf"][0]["maxLength"], json!(9));
        assert_eq!(props["o"]["anyOf"][1], json!({ "type": "null" }));
        assert!(props["o"].get("maxLength").is_none());
        assert_eq!(props["v"], json!(true));
        assert_eq!(props["u"], json!({}));
        assert_eq!(doc["$defs"]["Code"], json!({ "type": "string" }));
    }
}
