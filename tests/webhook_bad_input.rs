//! Bad webhook input never panics and never dispatches: malformed JSON, missing fields, wrong
//! types, non-UTF-8 bodies, oversized bodies, deep nesting, and thousands of random mutations of
//! real payloads. Hand-written cases live in `tests/fixtures/`; every fixture has an expectation.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::Path;

use axum::body::{Body, Bytes};
use axum::http::Request;
use common::RedisServer;
use tower::ServiceExt;
use tower_idempotency::http::{AllEvents, ExtractError, GitHubDispatchKey, GitLabDispatchKey, HttpKeyExtractor};
use webhook_support::{corpus_dir, files_in, fixture, github_delivery, status_and_body};

const FORK_SHA: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Debug, Clone, Copy)]
enum Expect {
    Key(&'static str),
    PassThrough,
    /// The error message starts with this.
    Rejected(&'static str),
}

use Expect::{Key, PassThrough, Rejected};

/// (fixture, event header, expectation with every event dispatching).
fn github_fixtures() -> Vec<(&'static str, &'static str, Expect)> {
    vec![
        (
            "check_run.suite_pull_requests.json",
            "check_run",
            Key("octo-org/fork-target:3:0123456789abcdef0123456789abcdef01234567"),
        ),
        // Its only listed pull request belongs to another repository (base repository id 77).
        ("check_suite.foreign_pull_request_only.json", "check_suite", PassThrough),
        ("check_suite.fork_pr.json", "check_suite", PassThrough),
        (
            "check_suite.missing_head_sha.json",
            "check_suite",
            Rejected("`check_suite` payload has no `check_suite.head_sha`"),
        ),
        (
            "check_suite.refs_pull_head_branch.json",
            "check_suite",
            Key("octo-org/fork-target:7:0123456789abcdef0123456789abcdef01234567"),
        ),
        (
            "check_suite.top_level_array.json",
            "check_suite",
            Rejected("malformed `check_suite` payload at `.`"),
        ),
        (
            "pull_request.bad_sha.json",
            "pull_request",
            Rejected("`pull_request` payload does not make a valid key"),
        ),
        (
            "pull_request.missing_repository.json",
            "pull_request",
            Rejected("`pull_request` payload has no `repository.full_name`"),
        ),
        (
            "pull_request.negative_number.json",
            "pull_request",
            Rejected("malformed `pull_request` payload at `pull_request.number`"),
        ),
        (
            "pull_request.non_utf8.bin",
            "pull_request",
            Rejected("request body is not valid UTF-8 (invalid byte at offset 129)"),
        ),
        (
            "pull_request.trailing_garbage.json",
            "pull_request",
            Rejected("malformed `pull_request` payload at `.`"),
        ),
        (
            "pull_request.truncated.json",
            "pull_request",
            Rejected("malformed `pull_request` payload at `"),
        ),
        (
            "pull_request.wrong_types.json",
            "pull_request",
            Rejected("malformed `pull_request` payload at `number`"),
        ),
        (
            "pull_request.zero_number.json",
            "pull_request",
            Rejected("`pull_request` payload does not make a valid key"),
        ),
        // #2 is another repository's (listed first); #5 and #6 are its own, and #6 has the
        // run's head SHA (in upper case). The repository is lower-cased in the key.
        (
            "workflow_run.foreign_and_own_pull_requests.json",
            "workflow_run",
            Key("octo-org/fork-target:6:0123456789abcdef0123456789abcdef01234567"),
        ),
        (
            "workflow_run.refs_pull_head_branch.json",
            "workflow_run",
            Key("octo-org/fork-target:8:0123456789abcdef0123456789abcdef01234567"),
        ),
    ]
}

/// (fixture, event header, expectation, expectation with detached merge-request pipelines).
fn gitlab_fixtures() -> Vec<(&'static str, &'static str, Expect, Expect)> {
    let same = |file, hook, expect| (file, hook, expect, expect);
    vec![
        same(
            "merge_request.missing_last_commit.json",
            "Merge Request Hook",
            Rejected("`merge_request` payload has no `object_attributes.last_commit.id`"),
        ),
        same(
            "merge_request.update_new_commits.json",
            "Merge Request Hook",
            Key("group/app:7:a91957a858320c0e17f3a0eca7cfacbff50ea29a"),
        ),
        same(
            "merge_request.update_title_only.json",
            "Merge Request Hook",
            Key("group/app:7:a91957a858320c0e17f3a0eca7cfacbff50ea29a"),
        ),
        same(
            "merge_request.wrong_types.json",
            "Merge Request Hook",
            Rejected("malformed `merge_request` payload at `object_attributes.iid`"),
        ),
        same("note.on_issue.json", "Note Hook", PassThrough),
        same("pipeline.branch_pipeline.json", "Pipeline Hook", PassThrough),
        // A merge train pipeline whose ref names the train ref: never keyed, its SHA is not the
        // merge request's head.
        same("pipeline.merge_train_ref.json", "Pipeline Hook", PassThrough),
        // A merged results pipeline as current GitLab sends it: `ref` is the source branch and
        // nothing says the SHA is the merge-ref commit. Passes through by default; with detached
        // pipelines declared, it is (by that declaration) keyed on its SHA.
        (
            "pipeline.merged_results.json",
            "Pipeline Hook",
            PassThrough,
            Key("group/app:7:a91957a858320c0e17f3a0eca7cfacbff50ea29a"),
        ),
    ]
}

fn assert_every_fixture_has_a_case(folder: &str, cased: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(folder);
    let on_disk: BTreeSet<String> = files_in(&dir).into_iter().map(|(name, _)| name).collect();
    let cased: BTreeSet<String> = cased.iter().map(|s| s.to_string()).collect();
    assert_eq!(on_disk, cased, "tests/fixtures/{folder} and the cases differ");
}

fn run<X: HttpKeyExtractor<Error = ExtractError>>(
    extractor: &X,
    header: (&str, &str),
    body: &[u8],
) -> Result<Option<String>, ExtractError> {
    let (mut parts, ()) = http::Request::post("/")
        .header(header.0, header.1)
        .body(())
        .unwrap()
        .into_parts();
    extractor
        .extract(&mut parts, &bytes::Bytes::copy_from_slice(body))
        .map(|key| key.map(|k| k.to_string()))
}

fn check(name: &str, got: Result<Option<String>, ExtractError>, expect: Expect) {
    match (expect, got) {
        (Key(key), Ok(Some(got))) => assert_eq!(got, key, "{name}"),
        (PassThrough, Ok(None)) => {}
        (Rejected(prefix), Err(error)) => {
            let message = error.to_string();
            assert!(
                message.starts_with(prefix),
                "{name}: `{message}` does not start with `{prefix}`"
            );
        }
        (expect, got) => panic!("{name}: expected {expect:?}, got {got:?}"),
    }
}

#[test]
fn hand_written_fixtures_get_their_key_pass_through_or_a_400_naming_the_problem() {
    let github = github_fixtures();
    assert_every_fixture_has_a_case("github", &github.iter().map(|c| c.0).collect::<Vec<_>>());
    for (file, event, expect) in github {
        let body = fixture(&format!("github/{file}"));
        check(
            file,
            run(
                &GitHubDispatchKey::new().with_filter(AllEvents),
                ("x-github-event", event),
                &body,
            ),
            expect,
        );
    }
    let gitlab = gitlab_fixtures();
    assert_every_fixture_has_a_case("gitlab", &gitlab.iter().map(|c| c.0).collect::<Vec<_>>());
    let all = GitLabDispatchKey::new().with_filter(AllEvents);
    let detached = all.clone().with_detached_pipelines(true);
    for (file, hook, expect, with_detached) in gitlab {
        let body = fixture(&format!("gitlab/{file}"));
        check(file, run(&all, ("x-gitlab-event", hook), &body), expect);
        check(file, run(&detached, ("x-gitlab-event", hook), &body), with_detached);
    }
}

#[test]
fn pathological_documents_are_refused_without_panicking() {
    let extractor = GitHubDispatchKey::new().with_filter(AllEvents);
    let header = ("x-github-event", "pull_request");
    let deep = format!("{}{}", r#"{"pull_request":"#.repeat(100_000), "}".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty body", Vec::new(), "malformed `pull_request` payload at `.`"),
        ("whitespace", b"  \n ".to_vec(), "malformed `pull_request` payload at `.`"),
        ("null", b"null".to_vec(), "malformed `pull_request` payload at `.`"),
        ("a string", br#""pull_request""#.to_vec(), "malformed `pull_request` payload at `.`"),
        ("deep nesting, unterminated", deep.into_bytes(), "malformed `pull_request` payload at `pull_request.pull_request`"),
        (
            "number beyond u64",
            format!(
                r#"{{"repository":{{"full_name":"o/r"}},"pull_request":{{"number":18446744073709551616,"head":{{"sha":"{FORK_SHA}"}}}}}}"#
            )
            .into_bytes(),
            "malformed `pull_request` payload at `pull_request.number`",
        ),
        (
            "float number",
            format!(r#"{{"repository":{{"full_name":"o/r"}},"pull_request":{{"number":2.5,"head":{{"sha":"{FORK_SHA}"}}}}}}"#)
                .into_bytes(),
            "malformed `pull_request` payload at `pull_request.number`",
        ),
        (
            "sha as a number",
            br#"{"repository":{"full_name":"o/r"},"pull_request":{"number":2,"head":{"sha":12345678}}}"#.to_vec(),
            "malformed `pull_request` payload at `pull_request.head.sha`",
        ),
        (
            "repository as a string",
            format!(r#"{{"repository":"o/r","pull_request":{{"number":2,"head":{{"sha":"{FORK_SHA}"}}}}}}"#).into_bytes(),
            "malformed `pull_request` payload at `repository`",
        ),
        (
            "project with a space",
            format!(r#"{{"repository":{{"full_name":"o /r"}},"pull_request":{{"number":2,"head":{{"sha":"{FORK_SHA}"}}}}}}"#)
                .into_bytes(),
            "`pull_request` payload does not make a valid key",
        ),
        (
            "escaped control character in the project",
            format!(
                r#"{{"repository":{{"full_name":"o/\u0000r"}},"pull_request":{{"number":2,"head":{{"sha":"{FORK_SHA}"}}}}}}"#
            )
            .into_bytes(),
            "`pull_request` payload does not make a valid key",
        ),
        (
            "lone surrogate",
            br#"{"repository":{"full_name":"o/\ud800"},"pull_request":{"number":2,"head":{"sha":"abcdef1"}}}"#.to_vec(),
            "malformed `pull_request` payload at `repository.full_name`",
        ),
        (
            "invalid UTF-8 in an ignored field",
            [&br#"{"title":""#[..], b"\xff\xfe", br#"","pull_request":{"number":2}}"#].concat(),
            "request body is not valid UTF-8",
        ),
    ];
    for (name, body, prefix) in cases {
        check(name, run(&extractor, header, &body), Rejected(prefix));
    }
    // Deeply nested well-formed JSON in a field we skip: skipped without recursion (no stack
    // overflow), and the event still lacks what it needs.
    let deep = format!(
        r#"{{"repository":{{"full_name":"o/r"}},"pull_request":{{"head":{{"sha":"{FORK_SHA}"}},"x":{}1{}}}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    check(
        "deep nesting, well formed",
        run(&extractor, header, deep.as_bytes()),
        Rejected("`pull_request` payload has no `pull_request.number`"),
    );

    // A missing or non-ASCII event header.
    let (mut parts, ()) = http::Request::post("/").body(()).unwrap().into_parts();
    let error = extractor.extract(&mut parts, &bytes::Bytes::new()).unwrap_err();
    assert_eq!(error.to_string(), "missing `x-github-event` header");
    let (mut parts, ()) = http::Request::post("/")
        .header(
            "x-github-event",
            http::HeaderValue::from_bytes(b"pull_request\xff").unwrap(),
        )
        .body(())
        .unwrap()
        .into_parts();
    let error = extractor.extract(&mut parts, &bytes::Bytes::new()).unwrap_err();
    assert_eq!(error.to_string(), "`x-github-event` header is not visible ASCII text");
}

/// A small deterministic generator, so a failure reproduces.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Lcg, body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len());
        match rng.below(7) {
            0 => {
                if let Some(b) = out.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => out.truncate(at),
            2 => {
                let end = (at + rng.below(64)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let junk: Vec<u8> = (0..rng.below(8) + 1).map(|_| rng.next() as u8).collect();
                out.splice(at..at, junk);
            }
            4 => {
                let token: &[u8] = [
                    &b"null"[..],
                    b"-1",
                    b"0",
                    b"\"x\"",
                    b"[]",
                    b"{}",
                    b"1e999",
                    b"\"refs/pull/0/head\"",
                ][rng.below(8)];
                out.splice(at..at, token.iter().copied());
            }
            5 => {
                if let Some(b) = out.get_mut(at) {
                    *b = [b'"', b'{', b'}', b'[', b']', b':', b',', b'\\'][rng.below(8)];
                }
            }
            _ => {
                let end = (at + rng.below(256)).min(out.len());
                let chunk = out[at..end].to_vec();
                out.splice(at..at, chunk);
            }
        }
    }
    out
}

#[test]
fn thousands_of_mutated_payloads_never_panic() {
    let mut seeds: Vec<(String, &'static str, Vec<u8>)> = Vec::new();
    for (file, event, _) in github_fixtures() {
        seeds.push((file.to_owned(), event, fixture(&format!("github/{file}"))));
    }
    if let Some(dir) = corpus_dir("github") {
        for (name, path) in files_in(&dir) {
            let Some(event) = name.split('.').next().filter(|_| name.ends_with(".payload.json")) else {
                continue;
            };
            let event: &'static str = Box::leak(event.to_owned().into_boxed_str());
            seeds.push((name, event, std::fs::read(path).unwrap()));
        }
    }
    let github = GitHubDispatchKey::new().with_filter(AllEvents);
    let gitlab = GitLabDispatchKey::new().with_filter(AllEvents);
    let mut rng = Lcg(0x5eed);
    let (mut keyed, mut passed, mut refused) = (0, 0, 0);
    for (name, event, body) in &seeds {
        for round in 0..400 {
            let mutated = mutate(&mut rng, body);
            let result = std::panic::catch_unwind(|| {
                let a = run(&github, ("x-github-event", event), &mutated);
                let b = run(&gitlab, ("x-gitlab-event", "Merge Request Hook"), &mutated);
                (a, b)
            });
            let (a, _) = result.unwrap_or_else(|_| {
                panic!(
                    "{name} mutation {round} panicked: {:?}",
                    String::from_utf8_lossy(&mutated)
                )
            });
            match a {
                Ok(Some(key)) => {
                    // Whatever was found is a valid triple key.
                    let (rest, sha) = key.rsplit_once(':').unwrap();
                    let (_, pr) = rest.rsplit_once(':').unwrap();
                    assert!(
                        pr.parse::<u64>().unwrap() > 0 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                        "{key}"
                    );
                    keyed += 1;
                }
                Ok(None) => passed += 1,
                Err(_) => refused += 1,
            }
        }
    }
    // The mutations exercised all three outcomes.
    assert!(
        keyed > 0 && passed > 0 && refused > 0,
        "keyed {keyed}, passed {passed}, refused {refused}"
    );
    println!("mutations: {keyed} keyed, {passed} passed through, {refused} refused");
}

/// The reference router, against a real Redis: bad input is answered 400/413 and nothing is
/// dispatched or claimed; the good fixtures among them dispatch exactly once each.
#[tokio::test]
async fn the_router_never_dispatches_bad_input() {
    let server = RedisServer::start();
    let mut cfg = webhook_router::RouterConfig::new(server.url());
    cfg.stream = "reviews".into();
    let app = webhook_router::build(&cfg).await.unwrap();

    let mut dispatched = Vec::new();
    for (file, event, expect) in github_fixtures() {
        let body = fixture(&format!("github/{file}"));
        let (status, text) =
            status_and_body(app.clone().oneshot(github_delivery(event, file, body)).await.unwrap()).await;
        match expect {
            Rejected(_) => assert_eq!(status, 400, "{file}: {text}"),
            PassThrough => assert_eq!((status, text.as_str()), (200, r#"{"status":"ignored"}"#), "{file}"),
            // check_run is not a dispatching event of the router; the others are suites/runs
            // completed with success.
            Key(key) if event == "check_run" => {
                assert_eq!(
                    (status, text.as_str()),
                    (200, r#"{"status":"ignored"}"#),
                    "{file} ({key})"
                )
            }
            Key(key) => {
                assert_eq!(status, 202, "{file}: {text}");
                dispatched.push(key);
            }
        }
    }

    // Oversized: declared, and streamed without a declared size.
    let big = vec![b' '; webhook_router_body_limit() + 1];
    let (status, _) = status_and_body(
        app.clone()
            .oneshot(github_delivery("check_suite", "big", big))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 413);
    let chunk = Bytes::from(vec![b' '; 1024 * 1024]);
    let chunks = (0..26).map(move |_| Ok::<_, Infallible>(chunk.clone()));
    let streamed = Request::post("/webhooks/github")
        .header("x-github-event", "check_suite")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let (status, _) = status_and_body(app.clone().oneshot(streamed).await.unwrap()).await;
    assert_eq!(status, 413);

    let entries = server.cli(&["XLEN", "reviews"]);
    assert_eq!(
        entries.trim(),
        dispatched.len().to_string(),
        "only the good fixtures were dispatched"
    );
    assert_eq!(dispatched.len(), 3);
    let claims = server.cli(&["KEYS", "github-dispatch:*"]);
    let mut claims: Vec<&str> = claims.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    claims.sort();
    let mut expected: Vec<String> = dispatched.iter().map(|k| format!("github-dispatch:{k}")).collect();
    expected.sort();
    assert_eq!(claims, expected, "claims exist only for what was dispatched");
}

fn webhook_router_body_limit() -> usize {
    tower_idempotency::http::DEFAULT_BODY_LIMIT
}
