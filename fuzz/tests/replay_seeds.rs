//! Replays seed inputs through the fuzz targets' own functions, without libFuzzer: the
//! repository's hand-written fixtures (`tests/fixtures/`), the real webhook payloads in
//! `../shared/corpus/`, a few hand-written hostile inputs, and whatever `fuzz/corpus/<target>/`
//! and `fuzz/artifacts/<target>/` hold locally. A panic here is the same finding libFuzzer
//! would report.
//!
//! Run from `fuzz/`: `cargo test` (stable, no `-Z` flags needed).

use std::path::{Path, PathBuf};

use tower_idempotency_fuzz::{Tally, github_webhook, gitlab_webhook, key};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files directly in `dir`, sorted. `required`: fail loudly when the folder is missing.
fn files_in(dir: &Path, required: bool) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if !required => {
            eprintln!("skipping {}: {e}", dir.display());
            return Vec::new();
        }
        Err(e) => panic!("seed folder {} is missing: {e}", dir.display()),
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` on every file of `dirs`; returns the summed tally and the number of files.
fn replay(target: fn(&[u8]) -> Tally, dirs: &[(PathBuf, bool)]) -> (Tally, usize) {
    let mut tally = Tally::default();
    let mut files = 0;
    for (dir, required) in dirs {
        for path in files_in(dir, *required) {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let result = std::panic::catch_unwind(|| target(&data));
            let one = result.unwrap_or_else(|_| panic!("target panicked on {}", path.display()));
            tally.add(one);
            files += 1;
        }
    }
    (tally, files)
}

fn local(target: &str) -> Vec<(PathBuf, bool)> {
    vec![
        (manifest_dir().join("corpus").join(target), false),
        (manifest_dir().join("artifacts").join(target), false),
    ]
}

/// Hostile inputs written out: deep nesting, control characters in keys, wrong types, huge
/// numbers, invalid UTF-8, hostile header lines (`event\ndelivery\nbody`).
const HOSTILE: &[&[u8]] = &[
    b"",
    b"{",
    b"[]",
    b"null",
    b"\xff\xfe",
    b"{\"pull_request\":{\"number\":-1,\"head\":{\"sha\":\"abcdef1\"}},\"repository\":{\"full_name\":\"a/b\"}}",
    b"{\"pull_request\":{\"number\":18446744073709551616,\"head\":{\"sha\":\"abcdef1\"}}}",
    b"{\"pull_request\":{\"number\":\"7\",\"head\":{\"sha\":\"abcdef1\"}}}",
    b"{\"pull_request\":{\"number\":7,\"head\":{\"sha\":\"ABCDEF1\"}},\"repository\":{\"full_name\":\"a/b\"}}",
    b"{\"pull_request\":{\"number\":7,\"head\":{\"sha\":\"main\"}},\"repository\":{\"full_name\":\"a\\nb\"}}",
    b"{\"check_suite\":{\"head_branch\":\"refs/pull/99999999999999999999/head\",\"pull_requests\":[]}}",
    b"pull_request\n\xff\n{}",
    b"Merge Request Hook\nx\n{\"object_attributes\":{\"iid\":0}}",
    b"a:1:abcdef1",
    b"a b:0:abcdef1",
    b"\xe2\x80\xae:1:abcdef1",
];

#[test]
fn github_webhook_target_replays_fixtures_corpus_and_hostile_inputs() {
    let root = manifest_dir().join("..");
    let mut dirs = vec![
        (root.join("tests/fixtures/github"), true),
        (root.join("../shared/corpus/github"), true),
    ];
    dirs.extend(local("github_webhook"));
    let (mut tally, files) = replay(github_webhook, &dirs);
    for input in HOSTILE {
        tally.add(github_webhook(input));
    }
    eprintln!("github_webhook: {files} files, {tally:?}");
    // The seeds reach every outcome, so the replay is not vacuous.
    assert!(
        tally.keys > 0 && tally.pass_throughs > 0 && tally.rejections > 0,
        "{tally:?}"
    );
}

#[test]
fn gitlab_webhook_target_replays_fixtures_corpus_and_hostile_inputs() {
    let root = manifest_dir().join("..");
    let mut dirs = vec![
        (root.join("tests/fixtures/gitlab"), true),
        (root.join("../shared/corpus/gitlab"), true),
    ];
    dirs.extend(local("gitlab_webhook"));
    let (mut tally, files) = replay(gitlab_webhook, &dirs);
    for input in HOSTILE {
        tally.add(gitlab_webhook(input));
    }
    eprintln!("gitlab_webhook: {files} files, {tally:?}");
    assert!(
        tally.keys > 0 && tally.pass_throughs > 0 && tally.rejections > 0,
        "{tally:?}"
    );
}

#[test]
fn key_target_replays_local_corpus_and_hostile_inputs() {
    let (mut tally, files) = replay(key, &local("key"));
    for input in HOSTILE {
        tally.add(key(input));
    }
    eprintln!("key: {files} files, {tally:?}");
    assert!(tally.keys > 0 && tally.rejections > 0, "{tally:?}");
}
