//! Every seed in `fuzz/corpus/<target>/` (and every crash a fuzzer ever found, which is kept
//! there as a regression) through its target: a failure here is a bug the fuzzer already
//! caught once.

use std::path::Path;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut ran = 0;
    for (name, target) in broker_fuzz::TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (each target has seeds)", dir.display()));
        let mut seeds = 0;
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("read seed");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "{name}: {} fails its target",
                path.display()
            );
            seeds += 1;
        }
        assert!(seeds > 0, "{name} has no seeds in {}", dir.display());
        ran += seeds;
    }
    eprintln!("{ran} corpus files passed");
}
