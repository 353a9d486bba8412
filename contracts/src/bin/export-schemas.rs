//! Writes the contracts' JSON Schemas and AsyncAPI document into `contracts/schemas/`:
//! `cargo run -p contracts --bin export-schemas`. Commit the result; a test fails when it is
//! stale. Any contracts crate can do the same with `outbox_contract::schema::export`.
#![allow(clippy::print_stdout)]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let written = outbox_contract::schema::export(&contracts::catalog()?, &dir)?;
    println!("wrote {} files to {}", written.len(), dir.display());
    Ok(())
}
