//! Compile-fail and compile-pass cases of the derives: one mistake per file, named after it.
//! Regenerate the `.stderr` files with `TRYBUILD=overwrite cargo test -p tests --test ui`,
//! then read every one: a new user must know from it what to change.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/fail/*.rs");
    t.pass("ui/pass/*.rs");
}
