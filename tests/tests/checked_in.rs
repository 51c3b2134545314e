//! Checked-in generated files are up to date. Regenerate them with `cargo xtask schedules`.

use std::path::Path;

use dualpipe_planner::plan;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn stale(path: &Path, expected: &str) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if text == expected => None,
        Ok(_) => Some(format!("{} is stale", path.display())),
        Err(e) => Some(format!("{}: {e}", path.display())),
    }
}

#[test]
fn canonical_schedules_are_current() {
    let mut problems = Vec::new();
    for (file, request) in dualpipe_tests::canonical() {
        let valid = plan(&request).unwrap();
        problems.extend(stale(
            &root().join("schedules").join(file),
            &valid.schedule().to_json(),
        ));
    }
    assert!(
        problems.is_empty(),
        "{}; run `cargo xtask schedules`",
        problems.join("; ")
    );
}

#[test]
fn json_schema_is_current() {
    let path = root().join("docs").join("schedule-v1.schema.json");
    if let Some(problem) = stale(&path, &dualpipe_schedule::json_schema()) {
        panic!("{problem}; run `cargo xtask schedules`");
    }
}

#[test]
fn canonical_dualpipe_schedules_equal_the_reference_goldens() {
    for name in ["dualpipe-8x20.json", "dualpipev-4x10.json"] {
        let ours = std::fs::read_to_string(root().join("schedules").join(name)).unwrap();
        let golden =
            std::fs::read_to_string(dualpipe_tests::fixtures().join("golden").join(name)).unwrap();
        assert!(
            ours == golden,
            "schedules/{name} differs from the reference golden"
        );
    }
}

#[test]
fn readme_family_table_is_the_planners() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = dualpipe_planner::families_markdown();
    assert!(
        readme.contains(&table),
        "README.md's table of schedules differs from the planner's; it should read:\n{table}"
    );
}
