//! Compiles the C-variadic exec hooks (`src/hooks/execl.c`: stable Rust cannot define variadic
//! functions) and exports them from `libbroker.so`.

fn main() {
    println!("cargo:rerun-if-changed=src/hooks/execl.c");
    println!("cargo:rerun-if-changed=execl.map");
    cc::Build::new()
        .file("src/hooks/execl.c")
        .warnings(true)
        .compile("broker_execl");
    let map = std::path::Path::new(
        &std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    )
    .join("execl.map");
    // rustc's version script marks every non-Rust symbol local; a second script adds ours.
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
}
