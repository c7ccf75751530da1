//! Compiles the C-variadic exec hooks (`src/hooks/execl.c`: stable Rust cannot define variadic
//! functions) and exports them from `libbroker.so`.

fn main() {
    println!("cargo:rerun-if-changed=src/hooks/execl.c");
    println!("cargo:rerun-if-changed=execl.map");
    cc::Build::new()
        .file("src/hooks/execl.c")
        .warnings(true)
        .compile("broker_execl");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let map = std::path::Path::new(&manifest_dir).join("execl.map");
    // rustc's version script marks every non-Rust symbol local; a second script adds ours.
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
    // `links = "broker_shim"`: the broker's build script gets this as `DEP_BROKER_SHIM_SRC`
    // and builds libbroker.so from these sources (a checkout's shim/, or the registry's copy of
    // this crate for `cargo install broker-cli`).
    println!("cargo:src={manifest_dir}");
}
