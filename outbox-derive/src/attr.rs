//! Parsing of `#[outbox(...)]` (and the few `#[serde(...)]` keys that change JSON field names)
//! into typed values. Every problem is recorded in the [`Ctxt`]; parsing goes on so that one
//! build reports every mistake.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};
use syn::meta::ParseNestedMeta;
use syn::parse::ParseStream;
use syn::{Attribute, Ident, Lit, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;
use crate::symbol::{self, one_of};

/// One attribute value, remembering where it was written so that a second occurrence is an
/// error at the second one (as serde's `Attr::set`).
pub(crate) struct Attr<T> {
    name: &'static str,
    value: Option<(Span, T)>,
    written: bool,
}

impl<T> Attr<T> {
    pub(crate) fn none(name: &'static str) -> Self {
        Self {
            name,
            value: None,
            written: false,
        }
    }

    /// Notes that the key was written, even if its value then fails to parse: such a key is
    /// wrong, not missing.
    pub(crate) fn written(&mut self) {
        self.written = true;
    }

    /// True when the key was written at all.
    pub(crate) fn is_written(&self) -> bool {
        self.written || self.value.is_some()
    }

    pub(crate) fn set(&mut self, cx: &mut Ctxt, tokens: impl ToTokens, value: T) {
        let tokens = tokens.into_token_stream();
        if self.value.is_some() {
            cx.error_spanned_by(
                tokens,
                format!(
                    "duplicate outbox attribute `{}`; remove one of them",
                    self.name
                ),
            );
        } else {
            let span = tokens
                .into_iter()
                .next()
                .map_or_else(Span::call_site, |t| t.span());
            self.value = Some((span, value));
        }
    }

    pub(crate) fn get(self) -> Option<T> {
        self.value.map(|(_, v)| v)
    }
}

/// The field or method named by `key = ...` or `aggregate = ...`.
#[derive(Clone)]
pub(crate) enum Accessor {
    /// `key = user_id`
    Field(Ident),
    /// `key = partition_key()`
    Method(Ident),
}

/// A validation rule inside `#[outbox(validate(...))]` on a field.
pub(crate) enum Rule {
    NonEmpty(Ident),
    Length {
        word: Ident,
        min: Option<LitInt>,
        max: Option<LitInt>,
    },
    Range {
        word: Ident,
        min: Option<Bound>,
        max: Option<Bound>,
    },
    Regex {
        word: Ident,
        pattern: LitStr,
    },
    Custom {
        word: Ident,
        path: syn::Path,
    },
    Nested(Ident),
}

/// A numeric bound of `range`, kept as written (`-1`, `0.5`) for the generated comparison, and
/// as JSON for the schema.
pub(crate) struct Bound {
    pub(crate) tokens: TokenStream,
    pub(crate) json: Option<JsonNumber>,
}

/// A bound as the schema writes it.
#[derive(Clone, Copy)]
pub(crate) enum JsonNumber {
    I64(i64),
    U64(u64),
    F64(f64),
}

/// Reports an unknown key and skips its value, so parsing can go on.
pub(crate) fn unknown(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, on: &str, valid: &[&str]) {
    let name = meta.path.to_token_stream().to_string().replace(' ', "");
    cx.error_spanned_by(
        &meta.path,
        format!(
            "unknown outbox attribute `{name}` on {on}; expected {}",
            one_of(valid)
        ),
    );
    skip_value(meta);
}

/// Consumes `= value` or `(...)` after a key, whatever it holds.
pub(crate) fn skip_value(meta: &ParseNestedMeta<'_>) {
    if meta.input.peek(Token![=]) {
        let _ = meta.input.parse::<Token![=]>();
        skip_rest(meta);
    } else if meta.input.peek(syn::token::Paren) {
        let _ = meta.input.parse::<proc_macro2::Group>();
    }
}

/// Consumes what is left of a value that failed to parse, up to the next `,`, so that the keys
/// after it are still read (and not reported missing).
pub(crate) fn skip_rest(meta: &ParseNestedMeta<'_>) {
    let _ = meta.input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tt, next)) = rest.token_tree() {
            if let proc_macro2::TokenTree::Punct(p) = &tt
                && p.as_char() == ','
            {
                return Ok(((), rest));
            }
            rest = next;
        }
        Ok(((), rest))
    });
}

/// `key = "text"`.
pub(crate) fn string(meta: &ParseNestedMeta<'_>, example: &str) -> syn::Result<LitStr> {
    let input = meta.value()?;
    let key = meta.path.to_token_stream();
    match input.parse::<Lit>() {
        Ok(Lit::Str(s)) => Ok(s),
        Ok(other) => Err(syn::Error::new_spanned(
            other,
            format!("expected a string literal, like `{key} = \"{example}\"`"),
        )),
        Err(e) => Err(syn::Error::new(
            e.span(),
            format!("expected a string literal, like `{key} = \"{example}\"`"),
        )),
    }
}

/// `version = N` with N an integer literal of 1 or more.
pub(crate) fn version(meta: &ParseNestedMeta<'_>) -> syn::Result<(u32, TokenStream)> {
    let input = meta.value()?;
    let neg: Option<Token![-]> = input.parse()?;
    let hint = "the version must be a whole number of 1 or more, like `version = 1`";
    let lit = input
        .parse::<Lit>()
        .map_err(|e| syn::Error::new(e.span(), hint))?;
    let tokens = quote!(#neg #lit);
    let Lit::Int(int) = &lit else {
        let got = match &lit {
            Lit::Str(_) => "a string",
            Lit::Float(_) => "a float",
            _ => "not an integer",
        };
        return Err(syn::Error::new_spanned(
            tokens,
            format!("{hint}; this is {got}"),
        ));
    };
    if !int.suffix().is_empty() {
        return Err(syn::Error::new_spanned(
            tokens,
            format!("{hint}, without a type suffix"),
        ));
    }
    if neg.is_some() {
        return Err(syn::Error::new_spanned(
            tokens,
            format!("{hint}; it cannot be negative"),
        ));
    }
    match int.base10_parse::<u32>() {
        Ok(0) => Err(syn::Error::new_spanned(
            tokens,
            "versions start at 1; use `version = 1` for the first version of an event",
        )),
        Ok(v) => Ok((v, tokens)),
        Err(_) => Err(syn::Error::new_spanned(
            tokens,
            format!("{hint}, at most {}", u32::MAX),
        )),
    }
}

/// `key = field` or `key = method()`.
pub(crate) fn accessor(meta: &ParseNestedMeta<'_>) -> syn::Result<Accessor> {
    let key = meta.path.to_token_stream();
    let input = meta.value()?;
    let ident: Ident = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("expected a field name or a method call, like `{key} = user_id` or `{key} = partition_key()`"),
        )
    })?;
    if input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in input);
        if !content.is_empty() {
            return Err(content.error(format!(
                "the method named by `{key}` takes no arguments besides `&self`"
            )));
        }
        Ok(Accessor::Method(ident))
    } else {
        Ok(Accessor::Field(ident))
    }
}

/// `validate = path::to_fn` on a struct.
pub(crate) fn path(meta: &ParseNestedMeta<'_>, example: &str) -> syn::Result<syn::Path> {
    let key = meta.path.to_token_stream();
    let input = meta.value()?;
    // A quoted path (`"check"`, as serde's `with = "..."`) is accepted too.
    if input.peek(LitStr) {
        let s: LitStr = input.parse()?;
        return s.parse();
    }
    input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("expected a path to a function, like `{key} = {example}`"),
        )
    })
}

/// The rules of `#[outbox(validate(...))]` on a field.
pub(crate) fn rules(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, rules: &mut Vec<Rule>) {
    if !meta.input.peek(syn::token::Paren) {
        cx.error_spanned_by(
            &meta.path,
            format!(
                "write the field's rules inside `validate(...)`, like `#[outbox(validate(non_empty, length(max = 64)))]`; the rules are {}",
                one_of(symbol::RULES)
            ),
        );
        skip_value(meta);
        return;
    }
    let mut seen: Vec<String> = Vec::new();
    let res = meta.parse_nested_meta(|rule| {
        let Some(word) = rule.path.get_ident().cloned() else {
            unknown_rule(cx, &rule);
            return Ok(());
        };
        // A rule written twice (`length(max = 5), length(max = 9)`) leaves the reader guessing
        // which bound holds; combine them into one.
        let name = word.to_string();
        if seen.contains(&name) && symbol::RULES.contains(&name.as_str()) {
            cx.error_spanned_by(
                &word,
                format!("duplicate validation rule `{name}`; write it once with all its settings"),
            );
            skip_value(&rule);
            return Ok(());
        }
        seen.push(name);
        let parsed = match word.to_string().as_str() {
            symbol::NON_EMPTY => Ok(Rule::NonEmpty(word)),
            symbol::NESTED => Ok(Rule::Nested(word)),
            symbol::LENGTH => length(cx, &rule, word),
            symbol::RANGE => range(cx, &rule, word),
            symbol::REGEX => regex(&rule, word),
            symbol::CUSTOM => path(&rule, "path::to_fn").map(|path| Rule::Custom { word, path }),
            _ => {
                unknown_rule(cx, &rule);
                return Ok(());
            }
        };
        match parsed {
            Ok(r) => rules.push(r),
            Err(e) => {
                cx.push(e);
                skip_rest(&rule);
            }
        }
        Ok(())
    });
    if let Err(e) = res {
        cx.push(e);
    }
}

fn unknown_rule(cx: &mut Ctxt, rule: &ParseNestedMeta<'_>) {
    let name = rule.path.to_token_stream().to_string().replace(' ', "");
    cx.error_spanned_by(
        &rule.path,
        format!(
            "unknown validation rule `{name}`; expected {}",
            one_of(symbol::RULES)
        ),
    );
    skip_value(rule);
}

/// `length(min = 1, max = 64)`.
fn length(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, word: Ident) -> syn::Result<Rule> {
    let (mut min, mut max) = (Attr::none(symbol::MIN), Attr::none(symbol::MAX));
    bounds(meta, "length(min = 1, max = 64)", |which, input| {
        let lit: LitInt = input.parse().map_err(|e| {
            syn::Error::new(
                e.span(),
                "`length` bounds are whole numbers, like `max = 64`",
            )
        })?;
        lit.base10_parse::<usize>()?;
        let slot = if which == symbol::MIN {
            &mut min
        } else {
            &mut max
        };
        slot.set(cx, &lit, lit.clone());
        Ok(())
    })?;
    let (min, max) = (min.get(), max.get());
    if let (Some(lo), Some(hi)) = (&min, &max)
        && lo.base10_parse::<usize>()? > hi.base10_parse::<usize>()?
    {
        return Err(syn::Error::new_spanned(
            quote!(#lo #hi),
            "`min` is greater than `max`, so no value could pass",
        ));
    }
    Ok(Rule::Length { word, min, max })
}

/// `range(min = -1, max = 2.5)`.
fn range(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, word: Ident) -> syn::Result<Rule> {
    let (mut min, mut max) = (Attr::none(symbol::MIN), Attr::none(symbol::MAX));
    bounds(meta, "range(min = 1, max = 100)", |which, input| {
        let bound = number(input)?;
        let slot = if which == symbol::MIN {
            &mut min
        } else {
            &mut max
        };
        let tokens = bound.tokens.clone();
        slot.set(cx, tokens, bound);
        Ok(())
    })?;
    Ok(Rule::Range {
        word,
        min: min.get(),
        max: max.get(),
    })
}

/// Parses `min = ..` and `max = ..` inside a rule's parentheses, at least one of them.
fn bounds(
    meta: &ParseNestedMeta<'_>,
    example: &str,
    mut each: impl FnMut(&str, ParseStream<'_>) -> syn::Result<()>,
) -> syn::Result<()> {
    let rule = meta.path.to_token_stream();
    if !meta.input.peek(syn::token::Paren) {
        return Err(syn::Error::new_spanned(
            &rule,
            format!("`{rule}` needs bounds, like `{example}`"),
        ));
    }
    let empty = meta
        .input
        .fork()
        .parse::<proc_macro2::Group>()
        .is_ok_and(|g| g.stream().is_empty());
    if empty {
        return Err(syn::Error::new_spanned(
            &rule,
            format!("`{rule}` needs `min`, `max` or both, like `{example}`"),
        ));
    }
    let mut any = false;
    meta.parse_nested_meta(|b| {
        let which = if b.path.is_ident(symbol::MIN) {
            symbol::MIN
        } else if b.path.is_ident(symbol::MAX) {
            symbol::MAX
        } else {
            return Err(b.error(format!(
                "unknown bound of `{rule}`; expected `min` or `max`, like `{example}`"
            )));
        };
        any = true;
        each(which, b.value()?)
    })?;
    if !any {
        return Err(syn::Error::new_spanned(
            &rule,
            format!("`{rule}` needs `min`, `max` or both, like `{example}`"),
        ));
    }
    Ok(())
}

/// An integer or float literal with an optional minus sign.
fn number(input: ParseStream<'_>) -> syn::Result<Bound> {
    let neg: Option<Token![-]> = input.parse()?;
    let lit: Lit = input.parse()?;
    let sign = if neg.is_some() { "-" } else { "" };
    let json = match &lit {
        Lit::Int(i) => {
            let text = format!("{sign}{}", i.base10_digits());
            if let Ok(v) = text.parse::<i64>() {
                Some(JsonNumber::I64(v))
            } else {
                text.parse::<u64>().ok().map(JsonNumber::U64)
            }
        }
        Lit::Float(f) => format!("{sign}{}", f.base10_digits())
            .parse::<f64>()
            .ok()
            .map(JsonNumber::F64),
        other => {
            return Err(syn::Error::new_spanned(
                other,
                "`range` bounds are numbers, like `min = 1` or `max = 0.5`",
            ));
        }
    };
    Ok(Bound {
        tokens: quote!(#neg #lit),
        json,
    })
}

/// `regex = "^[a-z]+$"`, checked now so that a bad pattern fails the build, not the first
/// event.
fn regex(meta: &ParseNestedMeta<'_>, word: Ident) -> syn::Result<Rule> {
    let pattern = string(meta, "^[a-z0-9-]+$")?;
    if let Err(e) = regex_syntax::Parser::new().parse(&pattern.value()) {
        let reason = match &e {
            regex_syntax::Error::Parse(p) => p.kind().to_string(),
            regex_syntax::Error::Translate(t) => t.kind().to_string(),
            other => other.to_string(),
        };
        return Err(syn::Error::new_spanned(
            &pattern,
            format!("invalid regex: {reason}"),
        ));
    }
    Ok(Rule::Regex { word, pattern })
}

/// The JSON names serde gives a struct's fields: `#[serde(rename = "..")]` on a field, else
/// `#[serde(rename_all = "..")]` on the struct. Anything else in `#[serde]` is serde's business,
/// and serde reports its mistakes, so this never fails.
#[derive(Default)]
pub(crate) struct SerdeNames {
    pub(crate) rename: Option<String>,
    pub(crate) rename_all: Option<String>,
    pub(crate) flatten: bool,
}

pub(crate) fn serde_names(attrs: &[Attribute]) -> SerdeNames {
    let mut names = SerdeNames::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") || meta.path.is_ident("rename_all") {
                let target = if meta.path.is_ident("rename") {
                    &mut names.rename
                } else {
                    &mut names.rename_all
                };
                if meta.input.peek(Token![=]) {
                    *target = Some(meta.value()?.parse::<LitStr>()?.value());
                } else {
                    // `rename(deserialize = "..")`: payloads are deserialized, so that name counts.
                    meta.parse_nested_meta(|inner| {
                        let v = inner.value()?.parse::<LitStr>()?.value();
                        if inner.path.is_ident("deserialize") {
                            *target = Some(v);
                        }
                        Ok(())
                    })?;
                }
            } else if meta.path.is_ident("flatten") {
                names.flatten = true;
            } else {
                skip_value(&meta);
            }
            Ok(())
        });
    }
    names
}

/// Applies a serde `rename_all` rule to a Rust field name.
pub(crate) fn rename_all(rule: &str, field: &str) -> String {
    let words: Vec<&str> = field.split('_').filter(|w| !w.is_empty()).collect();
    let capitalize = |w: &str| {
        let mut c = w.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect::<String>())
            .unwrap_or_default()
    };
    match rule {
        "lowercase" => field.to_lowercase(),
        "UPPERCASE" => field.to_uppercase(),
        "PascalCase" => words.iter().map(|w| capitalize(w)).collect(),
        "camelCase" => words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    (*w).to_owned()
                } else {
                    capitalize(w)
                }
            })
            .collect(),
        "kebab-case" => field.replace('_', "-"),
        "SCREAMING_SNAKE_CASE" => field.to_uppercase(),
        "SCREAMING-KEBAB-CASE" => field.to_uppercase().replace('_', "-"),
        _ => field.to_owned(),
    }
}
