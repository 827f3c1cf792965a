//! The committed header `include/edgelm.h` is what cbindgen generates from the code now.
//! Run with `EDGELM_BLESS=1` to rewrite it (`just header`).

use std::path::Path;

#[test]
fn committed_header_matches_the_code() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen parses the crate")
        .write(&mut generated);
    let header = crate_dir.join("../../include/edgelm.h");
    if std::env::var_os("EDGELM_BLESS").is_some() {
        std::fs::write(&header, &generated).unwrap();
    }
    let committed = std::fs::read(&header).unwrap_or_default();
    assert!(committed == generated, "include/edgelm.h differs from the code; run `just header` and commit the result");
}
