//! Collects every error of one derive, so a user sees all their mistakes at once.
//!
//! A `Ctxt` must be checked: [`Ctxt::check`] consumes it and hands back the errors, and dropping
//! one unchecked is a bug in this crate, caught by a panic in its own tests (serde_derive's
//! `internals/ctxt.rs` does the same), so that no path through a derive can lose an error.

use std::fmt::Display;

use proc_macro2::TokenStream;
use quote::ToTokens;

#[derive(Default)]
pub(crate) struct Ctxt {
    errors: Option<syn::Error>,
    checked: bool,
}

impl Ctxt {
    /// Records an error pointing at `tokens`.
    pub(crate) fn error_spanned_by(&mut self, tokens: impl ToTokens, msg: impl Display) {
        self.push(syn::Error::new_spanned(tokens, msg));
    }

    /// Records a parse error.
    pub(crate) fn push(&mut self, err: syn::Error) {
        match &mut self.errors {
            Some(all) => all.combine(err),
            None => self.errors = Some(err),
        }
    }

    /// Ends the collection: `Err` holds the `compile_error!`s of every recorded error.
    pub(crate) fn check(mut self) -> Result<(), TokenStream> {
        self.checked = true;
        match self.errors.take() {
            Some(e) => Err(e.to_compile_error()),
            None => Ok(()),
        }
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        if !self.checked && !std::thread::panicking() {
            panic!("outbox-derive: a Ctxt was dropped without being checked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ctxt;

    #[test]
    fn check_hands_back_every_error() {
        let mut cx = Ctxt::default();
        cx.error_spanned_by(quote::quote!(a), "first");
        cx.error_spanned_by(quote::quote!(b), "second");
        let errors = cx.check().unwrap_err().to_string();
        assert!(
            errors.contains("first") && errors.contains("second"),
            "{errors}"
        );
        assert!(Ctxt::default().check().is_ok());
    }

    #[test]
    #[should_panic(expected = "dropped without being checked")]
    fn an_unchecked_ctxt_is_a_bug() {
        let mut cx = Ctxt::default();
        cx.error_spanned_by(quote::quote!(a), "lost");
    }
}
