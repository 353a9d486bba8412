//! `impl Validate` from field rules, and the JSON Schema constraints they imply.
//! Shared by `#[derive(OutboxEvent)]` and `#[derive(Validate)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;

use crate::ast::{self, Body, Field, Root};
use crate::attr::{JsonNumber, Rule};
use crate::ctxt::Ctxt;
use crate::expand::root_at;

/// `#[derive(Validate)]`.
pub(crate) fn derive(input: &DeriveInput, root: Root) -> TokenStream {
    let mut cx = Ctxt::default();
    let body = ast::validate(&mut cx, input, root);
    let root = &body.root;
    if let Err(errors) = cx.check() {
        let ident = &input.ident;
        let (imp, ty, wh) = input.generics.split_for_impl();
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
        let root = root_at(root, path_span(path));
        quote_spanned! {path_span(path)=>
            #root::__private::merge(__outbox_path, #path(self), __outbox_out);
        }
    });
    let schema = schema_fn(body);
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
            #schema
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
        let r = root_at(root, rule_span(rule));
        let v = quote_spanned!(rule_span(rule)=> #r::validate);
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
                #r::Validate::validate_into(&self.#ident, &__p.render(), __outbox_out);
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

/// `Validate::__outbox_schema`: writes the fields' rules into the properties of the type's
/// schema, then has each `nested` field's type write its own into the schema of that field
/// (through `items`, `additionalProperties`, `$ref`, as its type says). Nothing when no field
/// has a rule JSON Schema can state.
fn schema_fn(body: &Body<'_>) -> Option<TokenStream> {
    let root = &body.root;
    let fields = schema_constraints(body);
    let nested: Vec<TokenStream> = body
        .fields
        .iter()
        .filter_map(|f| {
            let word = f.rules.iter().find_map(|r| match r {
                Rule::Nested(word) => Some(word),
                _ => None,
            })?;
            let ident = f.ident;
            // A flattened field's fields sit in this object; any other in its own property.
            let name = if f.flatten {
                quote!(::core::option::Option::None)
            } else {
                let name = &f.json_name;
                quote!(::core::option::Option::Some(#name))
            };
            // The closure only names the field's type. The call carries the rule's span, as the
            // `validate_into` call does.
            let root = root_at(root, word.span());
            let private = quote_spanned!(word.span()=> #root::__private);
            Some(quote_spanned! {word.span()=>
                (&#private::Nested::of(|__outbox_s: &Self| &__outbox_s.#ident)).__outbox_schema_of(
                    __outbox_cx,
                    &#private::SchemaCx::at(&__outbox_object, #name),
                );
            })
        })
        .collect();
    if fields.is_empty() && nested.is_empty() {
        return None;
    }
    let write = quote!(__outbox_cx.object::<Self>(__outbox_at, __OUTBOX_FIELDS));
    let (uses, body) = if nested.is_empty() {
        (None, quote!(#write;))
    } else {
        (
            Some(quote!(use #root::__private::{NestedRules as _, NoRules as _};)),
            quote! {
                for __outbox_object in #write {
                    #(#nested)*
                }
            },
        )
    };
    Some(quote! {
        fn __outbox_schema(__outbox_cx: &mut #root::__private::SchemaCx<'_>, __outbox_at: &str) {
            #uses
            const __OUTBOX_FIELDS: #root::__private::Constraints = &[#(#fields),*];
            #body
        }
    })
}

/// Each field's rules that JSON Schema can state, as `(property, &[Constraint])`.
///
/// The macro cannot see whether a field is a string, an array or an object, so it names the
/// rule (`MinSize`, not `minLength`), and `SchemaCx` picks the keyword from the `type` of the
/// property's schema when the schema is built.
fn schema_constraints(body: &Body<'_>) -> Vec<TokenStream> {
    let root = &body.root;
    let c = quote!(#root::__private::Constraint);
    let json = quote!(#root::__private::Json);
    body.fields
        .iter()
        .filter(|f| !f.flatten)
        .filter_map(|f| {
            let mut min_size: Option<u64> = None;
            let mut max_size: Option<u64> = None;
            let mut pattern: Option<String> = None;
            let mut non_empty = false;
            let mut numbers: Vec<TokenStream> = Vec::new();
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
                        for (kind, b) in [(quote!(Minimum), min), (quote!(Maximum), max)] {
                            if let Some(j) = b.as_ref().and_then(|b| b.json) {
                                let j = match j {
                                    JsonNumber::I64(v) => quote!(#json::I64(#v)),
                                    JsonNumber::U64(v) => quote!(#json::U64(#v)),
                                    JsonNumber::F64(v) => quote!(#json::F64(#v)),
                                };
                                numbers.push(quote!(#c::#kind(#j)));
                            }
                        }
                    }
                    Rule::Regex { pattern: p, .. } => {
                        pattern = Some(format!("^(?:{})$", p.value()));
                    }
                    Rule::Custom { .. } | Rule::Nested(_) => {}
                }
            }
            let mut list: Vec<TokenStream> = Vec::new();
            list.extend(min_size.map(|v| quote!(#c::MinSize(#v))));
            list.extend(max_size.map(|v| quote!(#c::MaxSize(#v))));
            list.extend(numbers);
            match pattern {
                Some(p) => list.push(quote!(#c::Pattern(#p))),
                // A blank string breaks `non_empty` on a string; `\S` says "has a non-space
                // character". One `pattern` per schema: a `regex` takes the place.
                None if non_empty => list.push(quote!(#c::NotBlank)),
                None => {}
            }
            if list.is_empty() {
                return None;
            }
            let name = &f.json_name;
            Some(quote!((#name, &[#(#list),*])))
        })
        .collect()
}
