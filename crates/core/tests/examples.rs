//! Every example workload shipped in examples/workloads is valid.

#[test]
fn every_example_workload_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/workloads");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let spec =
                boilerhouse_core::workload::parse_workload(&path.display().to_string(), &text)
                    .unwrap_or_else(|e| panic!("{e}"));
            assert!(spec.pool.min_size <= spec.pool.max_size);
            seen += 1;
        }
    }
    assert!(seen >= 3, "found {seen} examples in {}", dir.display());
}
