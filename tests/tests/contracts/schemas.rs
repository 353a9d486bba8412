//! The exported schemas carry only keywords that fit their type, and carry the rules of every
//! level the validator checks. Validators ignore `maxItems` on a string; code generators of
//! other languages and schema registries read it as a mistake.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outbox_runtime::validate::Length;
use outbox_runtime::{OutboxEvent, Validate};
use serde_json::{Value, json};

/// The keywords that apply to values of one JSON type only.
const STRING: &[&str] = &["minLength", "maxLength", "pattern", "format"];
const ARRAY: &[&str] = &[
    "minItems",
    "maxItems",
    "uniqueItems",
    "items",
    "prefixItems",
    "contains",
];
const OBJECT: &[&str] = &[
    "minProperties",
    "maxProperties",
    "properties",
    "required",
    "additionalProperties",
];
const NUMBER: &[&str] = &[
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// schemars states the width of a Rust number as its `format` (`"uint64"`, `"double"`), as
/// OpenAPI does, and code generators read it: these formats are for numbers; every other one
/// (`"date-time"`) is for strings.
const NUMBER_FORMATS: &[&str] = &[
    "int", "int8", "int16", "int32", "int64", "int128", "uint", "uint8", "uint16", "uint32",
    "uint64", "uint128", "float", "double",
];

/// The keywords of `doc` that do not fit the type of the schema carrying them, as
/// `pointer: message`, and how many typed keywords were checked.
fn misplaced(doc: &Value) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut checked = 0;
    check(doc, doc, "", &mut out, &mut checked);
    (out, checked)
}

/// The JSON types a schema states: its `type`, or its `$ref` target's.
fn types_of<'a>(root: &'a Value, node: &'a Value) -> Option<Vec<&'a str>> {
    let mut node = node;
    for _ in 0..32 {
        match node.get("type") {
            Some(Value::String(t)) => return Some(vec![t.as_str()]),
            Some(Value::Array(t)) => return Some(t.iter().filter_map(Value::as_str).collect()),
            _ => {}
        }
        let target = node.get("$ref")?.as_str()?.strip_prefix('#')?;
        node = root.pointer(target)?;
    }
    None
}

fn check(root: &Value, node: &Value, at: &str, out: &mut Vec<String>, checked: &mut usize) {
    let Value::Object(map) = node else { return };
    let types = types_of(root, node);
    for (key, value) in map {
        let fits: &[&str] =
            if key == "format" && value.as_str().is_some_and(|f| NUMBER_FORMATS.contains(&f)) {
                &["integer", "number"]
            } else if STRING.contains(&key.as_str()) {
                &["string"]
            } else if ARRAY.contains(&key.as_str()) {
                &["array"]
            } else if OBJECT.contains(&key.as_str()) {
                &["object"]
            } else if NUMBER.contains(&key.as_str()) {
                &["integer", "number"]
            } else {
                continue;
            };
        *checked += 1;
        match &types {
            None => out.push(format!("{at}: `{key}` on a schema with no type")),
            Some(t) if !t.iter().any(|t| fits.contains(t)) => {
                out.push(format!("{at}: `{key}` on a schema of type {}", t.join("|")))
            }
            Some(_) => {}
        }
    }
    // Subschemas, by the keywords that hold them.
    for key in [
        "properties",
        "patternProperties",
        "$defs",
        "definitions",
        "dependentSchemas",
    ] {
        if let Some(Value::Object(m)) = map.get(key) {
            for (name, sub) in m {
                check(root, sub, &format!("{at}/{key}/{name}"), out, checked);
            }
        }
    }
    for key in ["prefixItems", "anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(a)) = map.get(key) {
            for (i, sub) in a.iter().enumerate() {
                check(root, sub, &format!("{at}/{key}/{i}"), out, checked);
            }
        }
    }
    for key in [
        "items",
        "additionalProperties",
        "contains",
        "not",
        "if",
        "then",
        "else",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
    ] {
        if let Some(sub) = map.get(key) {
            check(root, sub, &format!("{at}/{key}"), out, checked);
        }
    }
}

/// The schema documents of an exported tree: each `v<N>.json`, and the header, payload and
/// key schemas of each message of `asyncapi.json`.
fn documents(dir: &Path) -> Vec<(String, Value)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        if name != "asyncapi.json" {
            docs.push((name, doc));
            continue;
        }
        for (id, message) in doc["components"]["messages"].as_object().unwrap() {
            for part in ["/headers", "/payload", "/bindings/kafka/key"] {
                if let Some(schema) = message.pointer(part) {
                    docs.push((format!("asyncapi.json {id}{part}"), schema.clone()));
                }
            }
        }
    }
    docs
}

#[test]
fn every_keyword_in_the_committed_schemas_fits_its_type() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../contracts/schemas");
    let docs = documents(&dir);
    let files = docs.iter().filter(|(n, _)| n.ends_with(".json")).count();
    assert!(files >= 12, "found only {files} schema files in {dir:?}");
    let (mut wrong, mut checked) = (Vec::new(), 0);
    for (name, doc) in &docs {
        let (found, n) = misplaced(doc);
        checked += n;
        wrong.extend(found.into_iter().map(|w| format!("{name} {w}")));
    }
    assert!(
        wrong.is_empty(),
        "keywords that do not fit:\n{}",
        wrong.join("\n")
    );
    // The walk reached the fields' keywords (about 200), not just the top of each file.
    assert!(checked > 100, "only {checked} keywords checked");
}

#[test]
fn the_walk_reports_keywords_that_do_not_fit() {
    let bad = json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "minItems": 1, "minLength": 1 },
            "tags": { "type": "array", "items": { "type": "string" }, "pattern": "\\S" },
            "note": { "type": ["string", "null"], "maxProperties": 3 },
            "count": { "type": "integer", "format": "date-time", "maxLength": 2 },
            "when": { "type": "string", "format": "uint64" },
            "code": { "$ref": "#/$defs/Code", "minItems": 1, "maxLength": 8 },
            "card": { "anyOf": [{ "$ref": "#/$defs/Card" }, { "type": "null" }], "minLength": 1 },
            "any": true
        },
        "$defs": {
            "Code": { "type": "string" },
            "Card": { "type": "object", "properties": { "n": { "type": "number", "minItems": 2 } } }
        }
    });
    let (mut found, _) = misplaced(&bad);
    found.sort();
    assert_eq!(
        found,
        [
            "/$defs/Card/properties/n: `minItems` on a schema of type number",
            "/properties/card: `minLength` on a schema with no type",
            "/properties/code: `minItems` on a schema of type string",
            "/properties/count: `format` on a schema of type integer",
            "/properties/count: `maxLength` on a schema of type integer",
            "/properties/name: `minItems` on a schema of type string",
            "/properties/note: `maxProperties` on a schema of type string|null",
            "/properties/tags: `pattern` on a schema of type array",
            "/properties/when: `format` on a schema of type string",
        ]
    );
}

// A payload with a rule on each shape a field's schema can take, and `nested` through each
// container: the rules land where JSON Schema can state them, and nowhere else.

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Validate)]
struct Line {
    #[outbox(validate(non_empty, length(max = 8)))]
    sku: String,
    #[outbox(validate(range(min = 1)))]
    qty: u32,
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Validate)]
struct Tree {
    #[outbox(validate(length(max = 4)))]
    name: String,
    #[outbox(validate(length(max = 3), nested))]
    children: Vec<Tree>,
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Validate)]
struct Extra {
    #[outbox(validate(length(max = 5)))]
    remark: String,
}

/// A newtype: schemars gives it a `$defs` entry of type string.
#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Code(String);

impl Length for Code {
    fn size(&self) -> Option<usize> {
        self.0.size()
    }
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, OutboxEvent)]
#[outbox(event_type = "shop.order.placed", version = 1, service = "shop")]
struct OrderPlaced {
    #[outbox(validate(non_empty, length(max = 10), nested))]
    lines: Vec<Line>,
    #[outbox(validate(nested))]
    gift: Option<Line>,
    #[outbox(validate(non_empty, nested))]
    by_sku: BTreeMap<String, Line>,
    #[outbox(validate(nested))]
    by_id: BTreeMap<u32, Tree>,
    #[outbox(validate(length(min = 2)))]
    note: Option<String>,
    #[outbox(validate(non_empty))]
    tags: Option<Vec<String>>,
    #[outbox(validate(range(max = 10)))]
    level: Option<u8>,
    #[outbox(validate(length(max = 12)))]
    code: Code,
    #[outbox(validate(non_empty))]
    alt_code: Option<Code>,
    #[outbox(validate(nested))]
    tree: Tree,
    #[serde(flatten)]
    #[outbox(validate(nested))]
    extra: Extra,
    data: serde_json::Value,
}

#[test]
fn rules_land_on_the_schema_of_their_type_at_every_level() {
    let schema = serde_json::to_value(OrderPlaced::json_schema()).unwrap();
    let at = |pointer: &str| {
        schema
            .pointer(pointer)
            .unwrap_or_else(|| panic!("no {pointer} in {schema:#}"))
            .clone()
    };
    // A size on an array, a map, an optional string, an optional array; `\S` only on strings.
    let lines = at("/properties/lines");
    assert_eq!(
        (lines["minItems"].clone(), lines["maxItems"].clone()),
        (json!(1), json!(10))
    );
    assert_eq!(at("/properties/by_sku")["minProperties"], json!(1));
    assert_eq!(at("/properties/note")["minLength"], json!(2));
    assert_eq!(at("/properties/tags")["minItems"], json!(1));
    for p in ["lines", "by_sku", "tags"] {
        assert!(
            at(&format!("/properties/{p}")).get("pattern").is_none(),
            "{p}"
        );
    }
    // A range on an optional integer, tighter than the type's own bound.
    let level = at("/properties/level");
    assert_eq!(
        (level["minimum"].clone(), level["maximum"].clone()),
        (json!(0), json!(10))
    );
    // Beside a `$ref`, in the type of its target; in the non-null branch of an `anyOf`.
    assert_eq!(at("/properties/code")["$ref"], json!("#/$defs/Code"));
    assert_eq!(at("/properties/code")["maxLength"], json!(12));
    assert_eq!(at("/properties/alt_code/anyOf/0")["minLength"], json!(1));
    assert_eq!(at("/properties/alt_code/anyOf/0")["pattern"], json!("\\S"));
    assert!(
        at("/properties/alt_code/anyOf/1")
            .get("minLength")
            .is_none()
    );
    assert!(
        at("/$defs/Code").get("maxLength").is_none(),
        "the rule is the field's, not the type's"
    );
    // `nested` through `Vec`, `Option` and maps: the nested type's `$defs` entry has its rules.
    let sku = at("/$defs/Line/properties/sku");
    assert_eq!(
        (
            sku["minLength"].clone(),
            sku["maxLength"].clone(),
            sku["pattern"].clone()
        ),
        (json!(1), json!(8), json!("\\S"))
    );
    assert_eq!(at("/$defs/Line/properties/qty")["minimum"], json!(1));
    // A recursive type, and a flattened one (its fields sit in the payload's object).
    assert_eq!(at("/$defs/Tree/properties/name")["maxLength"], json!(4));
    assert_eq!(at("/$defs/Tree/properties/children")["maxItems"], json!(3));
    assert_eq!(at("/properties/remark")["maxLength"], json!(5));
    // No rule on a schema with no type.
    assert_eq!(at("/properties/data"), json!(true));

    let (wrong, _) = misplaced(&schema);
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The gate walks the recursive type and finds the schema equal to itself.
    assert_eq!(
        outbox_runtime::schema::compare_schemas(&schema, &schema),
        Vec::<(String, String)>::new()
    );
}
