//! Links every guest with guest-lib's linker script.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rustc-link-arg-bins=-T{dir}/../../guest-lib/guest.ld");
    println!("cargo:rerun-if-changed=../../guest-lib/guest.ld");
}
