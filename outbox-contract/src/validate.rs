//! Payload validation: the [`Validate`] trait, the [`Violations`] it reports, and the checks
//! behind the `#[outbox(validate(...))]` field attributes.
//!
//! Every check reports instead of stopping, so one call to [`Validate::validate`] lists every
//! problem of a payload, each with the JSON path of the field that has it (`items[2].sku`).
//! Checks on an `Option` apply to the value inside and pass on `None`: an optional field that
//! is absent is not invalid.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;

/// One broken rule: which field, which rule, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    /// JSON path of the field, as it appears in the payload: `user_id`, `lines[0].sku`.
    /// Empty for a rule about the whole payload.
    pub path: String,
    /// The rule that failed: `non_empty`, `length`, `range`, `regex`, `custom`, or a code chosen
    /// by a user function.
    pub code: Cow<'static, str>,
    /// What is wrong, for a person: `must be at most 64 characters, got 70`.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every violation found in one payload, in field order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation of rule `code` at `path`.
    pub fn push(
        &mut self,
        path: impl Into<String>,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) {
        self.0.push(Violation {
            path: path.into(),
            code: code.into(),
            message: message.into(),
        });
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many violations were recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The violations, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, Violation> {
        self.0.iter()
    }

    /// `Ok(())` when empty, else `Err(self)`.
    pub fn into_result(self) -> Result<(), Violations> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            fmt::Display::fmt(v, f)?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

impl IntoIterator for Violations {
    type Item = Violation;
    type IntoIter = std::vec::IntoIter<Violation>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Violations {
    type Item = &'a Violation;
    type IntoIter = std::slice::Iter<'a, Violation>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A value that can check itself and report every problem with its JSON path.
///
/// `#[derive(OutboxEvent)]` implements it from the `#[outbox(validate(...))]` field attributes;
/// `#[derive(Validate)]` does the same for a struct nested in a payload
/// (`#[outbox(validate(nested))]` on the field).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be validated as a nested value",
    label = "`nested` needs a type that implements `Validate`",
    note = "add `#[derive(outbox_contract::Validate)]` to `{Self}`, or remove `nested`"
)]
pub trait Validate {
    /// Appends the violations of `self` to `out`, prefixing each path with `path`
    /// (empty at the payload's root).
    fn validate_into(&self, path: &str, out: &mut Violations);

    /// Every violation of `self`, or `Ok(())`.
    fn validate(&self) -> Result<(), Violations> {
        let mut out = Violations::new();
        self.validate_into("", &mut out);
        out.into_result()
    }
}

impl<T: Validate + ?Sized> Validate for &T {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        (**self).validate_into(path, out);
    }
}

impl<T: Validate + ?Sized> Validate for Box<T> {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        (**self).validate_into(path, out);
    }
}

impl<T: Validate> Validate for Option<T> {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        if let Some(v) = self {
            v.validate_into(path, out);
        }
    }
}

impl<T: Validate> Validate for [T] {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        for (i, v) in self.iter().enumerate() {
            v.validate_into(&format!("{path}[{i}]"), out);
        }
    }
}

impl<T: Validate, const N: usize> Validate for [T; N] {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        self.as_slice().validate_into(path, out);
    }
}

impl<T: Validate> Validate for Vec<T> {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        self.as_slice().validate_into(path, out);
    }
}

impl<K: fmt::Display, V: Validate> Validate for BTreeMap<K, V> {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        for (k, v) in self {
            v.validate_into(&join(path, &k.to_string()), out);
        }
    }
}

impl<K: fmt::Display, V: Validate, S> Validate for HashMap<K, V, S> {
    fn validate_into(&self, path: &str, out: &mut Violations) {
        for (k, v) in self {
            v.validate_into(&join(path, &k.to_string()), out);
        }
    }
}

/// `parent.child`, or `child` at the root.
pub fn join(parent: &str, child: &str) -> String {
    At::new(parent, child).render()
}

/// Where a check runs: a field `name` under a `parent` path. The path is only turned into a
/// string when a rule is broken, so validating a valid payload allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    parent: &'a str,
    name: &'a str,
}

impl<'a> At<'a> {
    /// The field `name` under `parent`; an empty `name` stands for `parent` itself (a
    /// `#[serde(flatten)]` field).
    pub fn new(parent: &'a str, name: &'a str) -> Self {
        Self { parent, name }
    }

    /// `parent.name`, `name` at the root, or `parent` for an empty name.
    pub fn render(self) -> String {
        match (self.parent.is_empty(), self.name.is_empty()) {
            (_, true) => self.parent.to_owned(),
            (true, false) => self.name.to_owned(),
            (false, false) => format!("{}.{}", self.parent, self.name),
        }
    }
}

/// Values with a size for `length` and `non_empty`: strings count characters (not bytes),
/// collections count items.
#[diagnostic::on_unimplemented(
    message = "`length` and `non_empty` need a string or a collection, but this field is `{Self}`",
    label = "not a string or a collection",
    note = "use `range(min = .., max = ..)` for numbers, or `custom = path::to_fn` for other types"
)]
pub trait Length {
    /// The size, or `None` when there is nothing to check (`Option::None`).
    fn size(&self) -> Option<usize>;
    /// True when the value counts as empty; for strings, blank (only whitespace) counts as empty.
    fn blank(&self) -> Option<bool> {
        self.size().map(|n| n == 0)
    }
}

impl Length for str {
    fn size(&self) -> Option<usize> {
        Some(self.chars().count())
    }
    fn blank(&self) -> Option<bool> {
        Some(self.trim().is_empty())
    }
}

impl Length for String {
    fn size(&self) -> Option<usize> {
        self.as_str().size()
    }
    fn blank(&self) -> Option<bool> {
        self.as_str().blank()
    }
}

impl Length for Cow<'_, str> {
    fn size(&self) -> Option<usize> {
        (**self).size()
    }
    fn blank(&self) -> Option<bool> {
        (**self).blank()
    }
}

impl<T: Length + ?Sized> Length for &T {
    fn size(&self) -> Option<usize> {
        (**self).size()
    }
    fn blank(&self) -> Option<bool> {
        (**self).blank()
    }
}

impl<T: Length + ?Sized> Length for Box<T> {
    fn size(&self) -> Option<usize> {
        (**self).size()
    }
    fn blank(&self) -> Option<bool> {
        (**self).blank()
    }
}

impl<T: Length> Length for Option<T> {
    fn size(&self) -> Option<usize> {
        self.as_ref().and_then(Length::size)
    }
    fn blank(&self) -> Option<bool> {
        self.as_ref().and_then(Length::blank)
    }
}

macro_rules! collection_size {
    ($($ty:ident < $($p:ident),* >),* $(,)?) => {$(
        impl<$($p),*> Length for $ty<$($p),*> {
            fn size(&self) -> Option<usize> {
                Some(self.len())
            }
        }
    )*};
}
collection_size!(Vec<T>, VecDeque<T>, BTreeSet<T>, BTreeMap<K, V>, HashSet<T, S>, HashMap<K, V, S>);

impl<T> Length for [T] {
    fn size(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl Length for serde_json::Map<String, serde_json::Value> {
    fn size(&self) -> Option<usize> {
        Some(self.len())
    }
}

/// Numbers for `range`.
#[diagnostic::on_unimplemented(
    message = "`range` needs a number, but this field is `{Self}`",
    label = "not an integer or a float",
    note = "use `length(min = .., max = ..)` for strings and collections, or `custom = path::to_fn` for other types"
)]
pub trait Number {
    /// The number type the bounds are written in.
    type Bound: PartialOrd + fmt::Display + Copy;
    /// The value to compare, or `None` when there is nothing to check (`Option::None`).
    fn number(&self) -> Option<Self::Bound>;
}

macro_rules! number {
    ($($ty:ty),*) => {$(
        impl Number for $ty {
            type Bound = $ty;
            fn number(&self) -> Option<$ty> {
                Some(*self)
            }
        }
    )*};
}
number!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64
);

impl<T: Number> Number for Option<T> {
    type Bound = T::Bound;
    fn number(&self) -> Option<T::Bound> {
        self.as_ref().and_then(Number::number)
    }
}

impl<T: Number + ?Sized> Number for &T {
    type Bound = T::Bound;
    fn number(&self) -> Option<T::Bound> {
        (**self).number()
    }
}

impl<T: Number + ?Sized> Number for Box<T> {
    type Bound = T::Bound;
    fn number(&self) -> Option<T::Bound> {
        (**self).number()
    }
}

/// Text for `regex`.
#[diagnostic::on_unimplemented(
    message = "`regex` needs a string, but this field is `{Self}`",
    label = "not a string",
    note = "`regex` applies to `String`, `&str`, `Cow<str>` and `Option`s of them"
)]
pub trait Text {
    /// The text, or `None` when there is nothing to check (`Option::None`).
    fn text(&self) -> Option<&str>;
}

impl Text for str {
    fn text(&self) -> Option<&str> {
        Some(self)
    }
}

impl Text for String {
    fn text(&self) -> Option<&str> {
        Some(self)
    }
}

impl Text for Cow<'_, str> {
    fn text(&self) -> Option<&str> {
        Some(self)
    }
}

impl<T: Text + ?Sized> Text for &T {
    fn text(&self) -> Option<&str> {
        (**self).text()
    }
}

impl<T: Text + ?Sized> Text for Box<T> {
    fn text(&self) -> Option<&str> {
        (**self).text()
    }
}

impl<T: Text> Text for Option<T> {
    fn text(&self) -> Option<&str> {
        self.as_ref().and_then(Text::text)
    }
}

/// `non_empty`: strings must not be blank, collections must hold an item.
pub fn non_empty<T: Length + ?Sized>(value: &T, at: At<'_>, out: &mut Violations) {
    if value.blank() == Some(true) {
        out.push(at.render(), "non_empty", "must not be empty");
    }
}

/// `length(min = .., max = ..)`, both bounds inclusive.
pub fn length<T: Length + ?Sized>(
    value: &T,
    min: Option<usize>,
    max: Option<usize>,
    at: At<'_>,
    out: &mut Violations,
) {
    let Some(n) = value.size() else { return };
    let too_short = min.is_some_and(|min| n < min);
    let too_long = max.is_some_and(|max| n > max);
    if too_short || too_long {
        out.push(at.render(), "length", bounds_message("length", n, min, max));
    }
}

/// `range(min = .., max = ..)`, both bounds inclusive; NaN is never in range.
pub fn range<N: PartialOrd + fmt::Display + Copy>(
    value: Option<N>,
    min: Option<N>,
    max: Option<N>,
    at: At<'_>,
    out: &mut Violations,
) {
    let Some(v) = value else { return };
    // Written as "not inside" so that NaN, which compares false with everything, fails.
    let above_min = min.is_none_or(|min| v >= min);
    let below_max = max.is_none_or(|max| v <= max);
    if !(above_min && below_max) {
        out.push(at.render(), "range", bounds_message("value", v, min, max));
    }
}

/// `regex = "..."`: the whole value must match (the pattern is anchored by the derive).
pub fn regex<T: Text + ?Sized>(
    value: &T,
    re: &regex::Regex,
    pattern: &str,
    at: At<'_>,
    out: &mut Violations,
) {
    let Some(s) = value.text() else { return };
    if !re.is_match(s) {
        out.push(at.render(), "regex", format!("must match `{pattern}`"));
    }
}

/// `custom = path::to_fn`: the function returns `Err(reason)` for an invalid value.
pub fn custom<E: fmt::Display>(result: Result<(), E>, at: At<'_>, out: &mut Violations) {
    if let Err(e) = result {
        out.push(at.render(), "custom", e.to_string());
    }
}

fn bounds_message<N: fmt::Display>(what: &str, got: N, min: Option<N>, max: Option<N>) -> String {
    match (min, max) {
        (Some(min), Some(max)) => format!("{what} must be between {min} and {max}, got {got}"),
        (Some(min), None) => format!("{what} must be at least {min}, got {got}"),
        (None, Some(max)) => format!("{what} must be at most {max}, got {got}"),
        (None, None) => format!("{what} out of range, got {got}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(name: &str) -> At<'_> {
        At::new("", name)
    }

    #[test]
    fn blank_strings_are_empty_and_length_counts_characters() {
        let mut out = Violations::new();
        non_empty("  \t", at("a"), &mut out);
        non_empty("x", at("b"), &mut out);
        length("héllo", None, Some(5), at("c"), &mut out);
        length("héllo!", None, Some(5), at("d"), &mut out);
        let paths: Vec<_> = out.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths, ["a", "d"]);
        assert_eq!(
            out.iter().nth(1).unwrap().message,
            "length must be at most 5, got 6"
        );
    }

    #[test]
    fn options_are_checked_only_when_present() {
        let mut out = Violations::new();
        let none: Option<String> = None;
        non_empty(&none, at("a"), &mut out);
        range(None::<u32>.number(), Some(1), None, at("b"), &mut out);
        assert!(out.is_empty());
        non_empty(&Some(String::new()), at("c"), &mut out);
        range(Some(0u32).number(), Some(1), None, at("d"), &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn nan_is_out_of_range() {
        let mut out = Violations::new();
        range(f64::NAN.number(), Some(0.0), Some(1.0), at("x"), &mut out);
        range(0.5f64.number(), Some(0.0), Some(1.0), at("y"), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out.iter().next().unwrap().path, "x");
    }

    #[test]
    fn nested_collections_prefix_index_paths() {
        struct Line(i32);
        impl Validate for Line {
            fn validate_into(&self, path: &str, out: &mut Violations) {
                range(self.0.number(), Some(1), None, At::new(path, "qty"), out);
            }
        }
        let lines = vec![Line(1), Line(0), Line(-2)];
        let mut out = Violations::new();
        lines.validate_into("lines", &mut out);
        let paths: Vec<_> = out.iter().map(|v| v.path.clone()).collect();
        assert_eq!(paths, ["lines[1].qty", "lines[2].qty"]);
        assert_eq!(
            out.to_string(),
            "lines[1].qty: value must be at least 1, got 0; lines[2].qty: value must be at least 1, got -2"
        );
    }
}
