//! `impl Validate` from field rules, and the JSON Schema constraints they imply.
//! Shared by `#[derive(OutboxEvent)]` and `#[derive(Validate)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;

use crate::ast::{self, Body, Field, Root};
use crate::attr::{JsonNumber, Rule};
use crate::ctxt::Ctxt;

/// `#[derive(Validate)]`.
pub(crate) fn derive(input: &DeriveInput, root: Root) -> TokenStream {
    let mut cx = Ctxt::default();
    let body = ast::validate(&mut cx, input, root);
    let root = &body.root;
    if cx.has_errors() {
        let ident = &input.ident;
        let (imp, ty, wh) = input.generics.split_for_impl();
        let errors = cx.into_compile_errors();
        // A stub, so that one mistake here does not also fail every payload nesting this type.
        return quote! {
            #errors
            #[automatically_derived]
            impl #imp #root::Validate for #ident #ty #wh {
                fn validate_into(&self, _: &str, _: &mut #root::Violations) {}
            }
        };
    }
    validate_impl(&body)
}

/// `impl Validate for T`: every rule of every field, then the struct's own function.
pub(crate) fn validate_impl(body: &Body<'_>) -> TokenStream {
    let ident = &body.input.ident;
    let root = &body.root;
    let (imp, ty, wh) = body.input.generics.split_for_impl();
    let fields = body
        .fields
        .iter()
        .filter(|f| !f.rules.is_empty())
        .map(|f| field_checks(root, f));
    let whole = body.validate_fn.as_ref().map(|path| {
        quote_spanned! {path_span(path)=>
            #root::__private::merge(__outbox_path, #path(self), __outbox_out);
        }
    });
    quote! {
        #[automatically_derived]
        impl #imp #root::Validate for #ident #ty #wh {
            fn validate_into(
                &self,
                __outbox_path: &str,
                __outbox_out: &mut #root::Violations,
            ) {
                #(#fields)*
                #whole
            }
        }
    }
}

fn path_span(path: &syn::Path) -> proc_macro2::Span {
    path.segments
        .last()
        .map_or_else(proc_macro2::Span::call_site, |s| s.ident.span())
}

/// The checks of one field, in the order its rules were written.
fn field_checks(root: &syn::Path, field: &Field<'_>) -> TokenStream {
    let ident = field.ident;
    let name = &field.json_name;
    let name = if field.flatten { "" } else { name.as_str() };
    let checks = field.rules.iter().map(|rule| {
        // Every token of a check, down to the path and the field name, takes the rule's span,
        // so an error underlines just the rule.
        let v = quote_spanned!(rule_span(rule)=> #root::validate);
        let ident = &{
            let mut i = ident.clone();
            i.set_span(rule_span(rule));
            i
        };
        // Each call carries the span of its rule, so a rule that does not fit the field's type
        // (`range` on a `String`) is reported under the rule in the attribute.
        match rule {
            Rule::NonEmpty(word) => quote_spanned! {word.span()=>
                #v::non_empty(&self.#ident, __p, __outbox_out);
            },
            Rule::Length { word, min, max } => {
                let (min, max) = (opt(min.as_ref().map(|m| quote!(#m))), opt(max.as_ref().map(|m| quote!(#m))));
                quote_spanned! {word.span()=>
                    #v::length(&self.#ident, #min, #max, __p, __outbox_out);
                }
            }
            Rule::Range { word, min, max } => {
                let (min, max) = (opt(min.as_ref().map(|b| b.tokens.clone())), opt(max.as_ref().map(|b| b.tokens.clone())));
                // Two steps, so that a field that is not a number gives one error, not a second
                // one about the bounds' type.
                quote_spanned! {word.span()=>
                    {
                        let __n = #v::Number::number(&self.#ident);
                        #v::range(__n, #min, #max, __p, __outbox_out);
                    }
                }
            }
            Rule::Regex { word, pattern } => {
                let anchored = format!("^(?:{})$", pattern.value());
                quote_spanned! {word.span()=>
                    {
                        static __RE: #root::__private::LazyLock<#root::__private::regex::Regex> =
                            #root::__private::LazyLock::new(|| #root::__private::compile_regex(#anchored));
                        #v::regex(&self.#ident, &__RE, #pattern, __p, __outbox_out);
                    }
                }
            }
            Rule::Custom { word, path } => quote_spanned! {word.span()=>
                #v::custom(#path(&self.#ident), __p, __outbox_out);
            },
            Rule::Nested(word) => quote_spanned! {word.span()=>
                #root::Validate::validate_into(&self.#ident, &__p.render(), __outbox_out);
            },
        }
    });
    quote! {
        {
            let __p = #root::validate::At::new(__outbox_path, #name);
            #(#checks)*
        }
    }
}

fn rule_span(rule: &Rule) -> proc_macro2::Span {
    match rule {
        Rule::NonEmpty(w) | Rule::Nested(w) => w.span(),
        Rule::Length { word, .. }
        | Rule::Range { word, .. }
        | Rule::Regex { word, .. }
        | Rule::Custom { word, .. } => word.span(),
    }
}

fn opt(v: Option<TokenStream>) -> TokenStream {
    match v {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    }
}

/// The entries of `SCHEMA_CONSTRAINTS`: each field's constraints for the payload's JSON Schema.
///
/// The macro cannot see whether a field is a string, an array or an object, so a size rule
/// sets the keyword of each (`minLength`, `minItems`, `minProperties`): JSON Schema applies
/// each only to values of its own type, so the others are inert.
pub(crate) fn schema_constraints(body: &Body<'_>) -> Vec<TokenStream> {
    let json = {
        let root = &body.root;
        quote!(#root::__private::Json)
    };
    body.fields
        .iter()
        .filter(|f| !f.flatten)
        .filter_map(|f| {
            let mut min_size: Option<u64> = None;
            let mut max_size: Option<u64> = None;
            let mut pattern: Option<String> = None;
            let mut non_empty = false;
            let mut pairs: Vec<TokenStream> = Vec::new();
            for rule in &f.rules {
                match rule {
                    Rule::NonEmpty(_) => {
                        non_empty = true;
                        min_size = Some(min_size.unwrap_or(0).max(1));
                    }
                    Rule::Length { min, max, .. } => {
                        if let Some(m) = min.as_ref().and_then(|m| m.base10_parse::<u64>().ok()) {
                            min_size = Some(min_size.unwrap_or(0).max(m));
                        }
                        if let Some(m) = max.as_ref().and_then(|m| m.base10_parse::<u64>().ok()) {
                            max_size = Some(max_size.map_or(m, |x| x.min(m)));
                        }
                    }
                    Rule::Range { min, max, .. } => {
                        for (kw, b) in [("minimum", min), ("maximum", max)] {
                            if let Some(j) = b.as_ref().and_then(|b| b.json) {
                                let j = match j {
                                    JsonNumber::I64(v) => quote!(#json::I64(#v)),
                                    JsonNumber::U64(v) => quote!(#json::U64(#v)),
                                    JsonNumber::F64(v) => quote!(#json::F64(#v)),
                                };
                                pairs.push(quote!((#kw, #j)));
                            }
                        }
                    }
                    Rule::Regex { pattern: p, .. } => {
                        pattern = Some(format!("^(?:{})$", p.value()));
                    }
                    Rule::Custom { .. } | Rule::Nested(_) => {}
                }
            }
            // A blank string breaks `non_empty`; `\S` says "has a non-space character".
            if non_empty && pattern.is_none() {
                pattern = Some("\\S".to_owned());
            }
            for (suffix, v) in [("min", min_size), ("max", max_size)] {
                if let Some(v) = v {
                    for kw in ["Length", "Items", "Properties"] {
                        let kw = format!("{suffix}{kw}");
                        pairs.push(quote!((#kw, #json::U64(#v))));
                    }
                }
            }
            if let Some(p) = pattern {
                pairs.push(quote!(("pattern", #json::Str(#p))));
            }
            if pairs.is_empty() {
                return None;
            }
            let name = &f.json_name;
            Some(quote!((#name, &[#(#pairs),*])))
        })
        .collect()
}
