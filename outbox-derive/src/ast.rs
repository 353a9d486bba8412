//! The intermediate form: what the user declared, with the original tokens kept for spans.
//! Built from `syn`'s input by the `from_*` functions, which record every mistake in the
//! [`Ctxt`] and still return as much as they understood.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::{Attribute, Data, DeriveInput, Fields, Ident, LitStr, Type};

use crate::attr::{self, Accessor, Attr, Rule};
use crate::check;
use crate::ctxt::Ctxt;
use crate::symbol::{self, one_of};

/// A struct deriving `OutboxEvent`.
pub(crate) struct Event<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) event_type: LitStr,
    pub(crate) version: u32,
    pub(crate) service: LitStr,
    pub(crate) key: Option<Accessor>,
    pub(crate) aggregate: Option<Accessor>,
    pub(crate) body: Body<'a>,
}

/// The validation part shared by `OutboxEvent` and `Validate`.
pub(crate) struct Body<'a> {
    pub(crate) input: &'a DeriveInput,
    /// Where generated code finds the traits; see [`Root`].
    pub(crate) root: syn::Path,
    pub(crate) fields: Vec<Field<'a>>,
    pub(crate) validate_fn: Option<syn::Path>,
}

/// A named field and its rules.
pub(crate) struct Field<'a> {
    pub(crate) ident: &'a Ident,
    /// The name of the field in the JSON payload, after serde's renames.
    pub(crate) json_name: String,
    /// `#[serde(flatten)]`: the field's own fields sit at this level of the JSON.
    pub(crate) flatten: bool,
    pub(crate) rules: Vec<Rule>,
}

/// An enum deriving `OutboxService`.
pub(crate) struct Service<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) vis: &'a syn::Visibility,
    pub(crate) service: LitStr,
    pub(crate) table: Option<LitStr>,
    pub(crate) topic: Option<LitStr>,
    pub(crate) group: Option<LitStr>,
    pub(crate) handler: Ident,
    pub(crate) variants: Vec<Variant<'a>>,
    /// Where generated code finds the traits; see [`Root`].
    pub(crate) root: syn::Path,
}

/// The crate that generated code names: `::outbox_runtime` through the runtime's derives,
/// `::outbox_contract` through the contract crate's, whichever a user depends on; or the path
/// given with `#[outbox(crate = "...")]` (as serde's `#[serde(crate = "...")]`), for a crate that
/// re-exports either under another name.
#[derive(Clone, Copy)]
pub(crate) enum Root {
    Runtime,
    Contract,
}

impl Root {
    pub(crate) fn path(self) -> syn::Path {
        match self {
            Root::Runtime => syn::parse_quote!(::outbox_runtime),
            Root::Contract => syn::parse_quote!(::outbox_contract),
        }
    }
}

/// `crate = "::path"`, recorded in `root`.
fn crate_path(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>, root: &mut Attr<syn::Path>) {
    if let Some(lit) = keep(cx, meta, attr::string(meta, "::outbox_runtime")) {
        match lit.parse::<syn::Path>() {
            Ok(path) => root.set(cx, &meta.path, path),
            Err(_) => cx.error_spanned_by(
                &lit,
                "`crate` takes a path to `outbox_runtime` or `outbox_contract`, like `crate = \"::my_facade::outbox\"`",
            ),
        }
    }
}

/// One variant of a service enum: `FeishuRequested(FeishuRequested)`.
pub(crate) struct Variant<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
    pub(crate) method: Ident,
    pub(crate) docs: Vec<&'a Attribute>,
}

/// The `#[outbox(...)]` attributes of an item.
fn outbox_attrs(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|a| a.path().is_ident(symbol::OUTBOX))
}

/// Reads one `#[outbox(...)]` list, recording a malformed list as an error.
fn each_meta(
    cx: &mut Ctxt,
    attrs: &[Attribute],
    mut f: impl FnMut(&mut Ctxt, &syn::meta::ParseNestedMeta<'_>),
) {
    for attr in outbox_attrs(attrs) {
        if let syn::Meta::Path(p) = &attr.meta {
            cx.error_spanned_by(
                p,
                "`#[outbox]` needs its settings in parentheses, like `#[outbox(event_type = \"a.b\", version = 1, service = \"svc\")]`",
            );
            continue;
        }
        let res = attr.parse_nested_meta(|meta| {
            f(cx, &meta);
            Ok(())
        });
        if let Err(e) = res {
            cx.push(e);
        }
    }
}

/// Records `Err` in the context, keeps `Ok`.
fn keep<T>(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>, r: syn::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            cx.push(e);
            attr::skip_rest(meta);
            None
        }
    }
}

/// A name literal checked by `rule`, recording a broken rule at the literal.
fn checked(cx: &mut Ctxt, lit: LitStr, rule: fn(&str) -> Result<(), String>) -> LitStr {
    if let Err(msg) = rule(&lit.value()) {
        cx.error_spanned_by(&lit, msg);
    }
    lit
}

pub(crate) fn event<'a>(cx: &mut Ctxt, input: &'a DeriveInput, root: Root) -> Option<Event<'a>> {
    let mut krate = Attr::none(symbol::CRATE);
    let mut event_type = Attr::none(symbol::EVENT_TYPE);
    let mut version = Attr::none(symbol::VERSION);
    let mut service = Attr::none(symbol::SERVICE);
    let mut key = Attr::none(symbol::KEY);
    let mut aggregate = Attr::none(symbol::AGGREGATE);
    let mut validate_fn = Attr::none(symbol::VALIDATE);

    each_meta(cx, &input.attrs, |cx, meta| {
        let p = &meta.path;
        if p.is_ident(symbol::EVENT_TYPE) {
            event_type.written();
            if let Some(lit) = keep(
                cx,
                meta,
                attr::string(meta, "notification.feishu.requested"),
            ) {
                let lit = checked(cx, lit, check::event_type);
                event_type.set(cx, p, lit);
            }
        } else if p.is_ident(symbol::VERSION) {
            version.written();
            if let Some((v, _)) = keep(cx, meta, attr::version(meta)) {
                version.set(cx, p, v);
            }
        } else if p.is_ident(symbol::SERVICE) {
            service.written();
            if let Some(lit) = keep(cx, meta, attr::string(meta, "notification")) {
                let lit = checked(cx, lit, check::service);
                service.set(cx, p, lit);
            }
        } else if p.is_ident(symbol::KEY) {
            if let Some(a) = keep(cx, meta, attr::accessor(meta)) {
                key.set(cx, p, a);
            }
        } else if p.is_ident(symbol::AGGREGATE) {
            if let Some(a) = keep(cx, meta, attr::accessor(meta)) {
                aggregate.set(cx, p, a);
            }
        } else if p.is_ident(symbol::VALIDATE) {
            if let Some(path) = keep(cx, meta, attr::path(meta, "check_payload")) {
                validate_fn.set(cx, p, path);
            }
        } else if p.is_ident(symbol::CRATE) {
            crate_path(cx, meta, &mut krate);
        } else {
            attr::unknown(cx, meta, "an event", symbol::EVENT_KEYS);
        }
    });

    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        cx.error_spanned_by(
            &input.generics,
            "an event contract cannot be generic: its event type and version name one payload shape; declare one struct per event",
        );
    }
    let shape_ok = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(_) => true,
            Fields::Unnamed(_) => {
                cx.error_spanned_by(
                    &s.fields,
                    "an event payload needs named fields, so that it is a JSON object with a schema and each field has a name in error messages; write `struct Name { field: Type }`",
                );
                false
            }
            Fields::Unit => {
                cx.error_spanned_by(
                    ident,
                    "an event payload needs named fields; for an event with no data, write `struct Name {}`",
                );
                false
            }
        },
        Data::Enum(e) => {
            cx.error_spanned_by(
                e.enum_token,
                "`OutboxEvent` goes on a struct, one per event; to group a service's events in an enum, derive `OutboxService` on it",
            );
            false
        }
        Data::Union(u) => {
            cx.error_spanned_by(
                u.union_token,
                "`OutboxEvent` cannot be derived for a union; declare the payload as a struct with named fields",
            );
            false
        }
    };

    let missing: Vec<&str> = [
        (symbol::EVENT_TYPE, event_type.is_written()),
        (symbol::VERSION, version.is_written()),
        (symbol::SERVICE, service.is_written()),
    ]
    .into_iter()
    .filter_map(|(k, written)| (!written).then_some(k))
    .collect();
    if !missing.is_empty() {
        cx.error_spanned_by(
            ident,
            format!(
                "missing {} in `#[outbox(...)]`; an event declares all three, like `#[outbox(event_type = \"notification.feishu.requested\", version = 1, service = \"notification\")]`",
                one_of(&missing)
            ),
        );
    }

    let root = krate.get().unwrap_or_else(|| root.path());
    let body = body(cx, input, validate_fn.get(), root);
    let (key, aggregate) = (key.get(), aggregate.get());
    if shape_ok {
        for acc in [&key, &aggregate].into_iter().flatten() {
            check_accessor(cx, ident, &body, acc);
        }
    }
    Some(Event {
        ident,
        event_type: event_type.get()?,
        version: version.get()?,
        service: service.get()?,
        key,
        aggregate,
        body,
    })
}

/// `key = field` must name a field of the struct; for a typo, say which fields exist.
fn check_accessor(cx: &mut Ctxt, ident: &Ident, body: &Body<'_>, acc: &Accessor) {
    let Accessor::Field(name) = acc else { return };
    if body.fields.iter().any(|f| f.ident == name) {
        return;
    }
    let fields: Vec<String> = body.fields.iter().map(|f| f.ident.to_string()).collect();
    let names: Vec<&str> = fields.iter().map(String::as_str).collect();
    let choices = if names.is_empty() {
        format!("`{ident}` has no fields")
    } else {
        format!("its fields are {}", one_of(&names))
    };
    cx.error_spanned_by(
        name,
        format!("`{ident}` has no field `{name}`; {choices}. To use a method, write `{name}()`"),
    );
}

/// The fields and their rules, for `OutboxEvent` and `Validate`.
pub(crate) fn body<'a>(
    cx: &mut Ctxt,
    input: &'a DeriveInput,
    validate_fn: Option<syn::Path>,
    root: syn::Path,
) -> Body<'a> {
    let rename_all = attr::serde_names(&input.attrs).rename_all;
    let mut fields = Vec::new();
    if let Data::Struct(s) = &input.data {
        for f in &s.fields {
            let mut rules = Vec::new();
            let mut seen = Attr::none(symbol::VALIDATE);
            each_meta(cx, &f.attrs, |cx, meta| {
                if meta.path.is_ident(symbol::VALIDATE) {
                    seen.set(cx, &meta.path, ());
                    attr::rules(cx, meta, &mut rules);
                } else {
                    attr::unknown(cx, meta, "a field", symbol::FIELD_KEYS);
                }
            });
            let Some(ident) = &f.ident else {
                if !rules.is_empty() {
                    cx.error_spanned_by(f, "validation rules need a named field");
                }
                continue;
            };
            let serde = attr::serde_names(&f.attrs);
            let plain = ident.to_string();
            let plain = plain.strip_prefix("r#").unwrap_or(&plain);
            let json_name = serde.rename.unwrap_or_else(|| match &rename_all {
                Some(rule) => attr::rename_all(rule, plain),
                None => plain.to_owned(),
            });
            fields.push(Field {
                ident,
                json_name,
                flatten: serde.flatten,
                rules,
            });
        }
    }
    Body {
        input,
        root,
        fields,
        validate_fn,
    }
}

/// A struct deriving only `Validate`.
pub(crate) fn validate<'a>(cx: &mut Ctxt, input: &'a DeriveInput, root: Root) -> Body<'a> {
    let mut validate_fn = Attr::none(symbol::VALIDATE);
    let mut krate = Attr::none(symbol::CRATE);
    each_meta(cx, &input.attrs, |cx, meta| {
        if meta.path.is_ident(symbol::VALIDATE) {
            if let Some(path) = keep(cx, meta, attr::path(meta, "check_payload")) {
                validate_fn.set(cx, &meta.path, path);
            }
        } else if meta.path.is_ident(symbol::CRATE) {
            crate_path(cx, meta, &mut krate);
        } else {
            attr::unknown(
                cx,
                meta,
                "a struct deriving `Validate`",
                symbol::VALIDATE_KEYS,
            );
        }
    });
    match &input.data {
        Data::Struct(s) if matches!(s.fields, Fields::Named(_) | Fields::Unit) => {}
        _ => cx.error_spanned_by(
            &input.ident,
            "`Validate` can be derived for structs with named fields only",
        ),
    }
    let root = krate.get().unwrap_or_else(|| root.path());
    body(cx, input, validate_fn.get(), root)
}

pub(crate) fn service<'a>(
    cx: &mut Ctxt,
    input: &'a DeriveInput,
    root: Root,
) -> Option<Service<'a>> {
    let mut krate = Attr::none(symbol::CRATE);
    let mut service = Attr::none(symbol::SERVICE);
    let mut table = Attr::none(symbol::TABLE);
    let mut topic = Attr::none(symbol::TOPIC);
    let mut group = Attr::none(symbol::GROUP);
    let mut handler = Attr::none(symbol::HANDLER);
    each_meta(cx, &input.attrs, |cx, meta| {
        let p = &meta.path;
        let name = |cx: &mut Ctxt, example, rule| {
            keep(cx, meta, attr::string(meta, example)).map(|lit| checked(cx, lit, rule))
        };
        if p.is_ident(symbol::SERVICE) {
            service.written();
            if let Some(l) = name(cx, "notification", check::service) {
                service.set(cx, p, l);
            }
        } else if p.is_ident(symbol::TABLE) {
            if let Some(l) = name(cx, "notification_outbox", check::table) {
                table.set(cx, p, l);
            }
        } else if p.is_ident(symbol::TOPIC) {
            if let Some(l) = name(cx, "smartflow.notification.outbox", check::topic) {
                topic.set(cx, p, l);
            }
        } else if p.is_ident(symbol::GROUP) {
            if let Some(l) = name(cx, "smartflow-notification-outbox-consumer", check::group) {
                group.set(cx, p, l);
            }
        } else if p.is_ident(symbol::HANDLER) {
            if let Some(i) = keep(cx, meta, ident_value(meta, "NotificationHandler")) {
                handler.set(cx, p, i);
            }
        } else if p.is_ident(symbol::CRATE) {
            crate_path(cx, meta, &mut krate);
        } else {
            attr::unknown(cx, meta, "a service enum", symbol::SERVICE_KEYS);
        }
    });

    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        cx.error_spanned_by(
            &input.generics,
            "a service enum cannot be generic; list the service's event types in its variants",
        );
    }
    let mut variants = Vec::new();
    match &input.data {
        Data::Enum(e) => {
            if e.variants.is_empty() {
                cx.error_spanned_by(
                    ident,
                    "a service needs at least one event; add a variant like `FeishuRequested(FeishuRequested)`",
                );
            }
            for v in &e.variants {
                if let Some(var) = variant(cx, v) {
                    variants.push(var);
                }
            }
        }
        Data::Struct(s) => cx.error_spanned_by(
            s.struct_token,
            "`OutboxService` goes on an enum with one variant per event, like `enum NotificationEvents { FeishuRequested(FeishuRequested) }`; for a single event payload, derive `OutboxEvent`",
        ),
        Data::Union(u) => cx.error_spanned_by(
            u.union_token,
            "`OutboxService` goes on an enum with one variant per event, not on a union",
        ),
    }
    check_methods(cx, &variants);

    if !service.is_written() {
        cx.error_spanned_by(
            ident,
            "missing `service` in `#[outbox(...)]`; name the service whose events these are, like `#[outbox(service = \"notification\")]`",
        );
    }
    let handler = handler.get().unwrap_or_else(|| {
        Ident::new(
            &format!("{}Handler", syn::ext::IdentExt::unraw(ident)),
            ident.span(),
        )
    });
    // Without a service name the expansion stops at the errors, but still gets a name here so
    // that the fallback can emit the handler trait.
    let service = service
        .get()
        .unwrap_or_else(|| LitStr::new("", proc_macro2::Span::call_site()));
    Some(Service {
        ident,
        vis: &input.vis,
        service,
        table: table.get(),
        topic: topic.get(),
        group: group.get(),
        handler,
        variants,
        root: krate.get().unwrap_or_else(|| root.path()),
    })
}

/// `handler = Name`.
fn ident_value(meta: &syn::meta::ParseNestedMeta<'_>, example: &str) -> syn::Result<Ident> {
    let key = meta.path.to_token_stream();
    meta.value()?.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("expected a name, like `{key} = {example}`"),
        )
    })
}

fn variant<'a>(cx: &mut Ctxt, v: &'a syn::Variant) -> Option<Variant<'a>> {
    let mut method = Attr::none(symbol::HANDLER);
    each_meta(cx, &v.attrs, |cx, meta| {
        if meta.path.is_ident(symbol::HANDLER) {
            if let Some(i) = keep(cx, meta, ident_value(meta, "on_feishu_requested")) {
                method.set(cx, &meta.path, i);
            }
        } else {
            attr::unknown(cx, meta, "a service variant", symbol::VARIANT_KEYS);
        }
    });
    let ty = match &v.fields {
        Fields::Unnamed(f) if f.unnamed.len() == 1 => &f.unnamed[0].ty,
        other => {
            let span: TokenStream = if matches!(other, Fields::Unit) {
                v.ident.to_token_stream()
            } else {
                other.to_token_stream()
            };
            cx.error_spanned_by(
                span,
                format!(
                    "each variant of a service enum holds exactly one event, like `{}(EventPayload)`",
                    v.ident
                ),
            );
            return None;
        }
    };
    let method = method.get().unwrap_or_else(|| method_name(&v.ident));
    Some(Variant {
        ident: &v.ident,
        ty,
        method,
        docs: v
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .collect(),
    })
}

/// Two variants whose handler methods would share a name (say `FeishuRequestedV2` and
/// `FeishuRequestedV_2`, or a `handler = ...` rename) would make the trait ambiguous.
fn check_methods(cx: &mut Ctxt, variants: &[Variant<'_>]) {
    for (i, v) in variants.iter().enumerate() {
        if let Some(first) = variants[..i].iter().find(|w| w.method == v.method) {
            cx.error_spanned_by(
                &v.method,
                format!(
                    "variants `{}` and `{}` would both be handled by a method named `{}`; rename one with `#[outbox(handler = other_name)]`",
                    first.ident, v.ident, v.method
                ),
            );
        }
    }
}

/// The handler method for a variant: its name in snake case, raw when that is a keyword
/// (`Type` → `r#type`), with `_` after the few keywords that cannot be raw (`Self` → `self_`).
fn method_name(variant: &Ident) -> Ident {
    let name = snake_case(&syn::ext::IdentExt::unraw(variant).to_string());
    if syn::parse_str::<Ident>(&name).is_ok() {
        return Ident::new(&name, variant.span());
    }
    match name.as_str() {
        "self" | "super" | "crate" | "_" => Ident::new(&format!("{name}_"), variant.span()),
        _ => Ident::new_raw(&name, variant.span()),
    }
}

/// `FeishuRequestedV2` → `feishu_requested_v2`.
pub(crate) fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let chars: Vec<char> = name.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1);
            let boundary = prev.is_some_and(|p| {
                p.is_lowercase()
                    || p.is_ascii_digit()
                    || (p.is_uppercase() && next.is_some_and(|n| n.is_lowercase()))
            });
            if boundary {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::snake_case;

    #[test]
    fn snake_case_of_variant_names() {
        assert_eq!(snake_case("FeishuRequested"), "feishu_requested");
        assert_eq!(snake_case("FeishuRequestedV2"), "feishu_requested_v2");
        assert_eq!(snake_case("HTTPCallMade"), "http_call_made");
        assert_eq!(snake_case("Triggered"), "triggered");
    }
}
