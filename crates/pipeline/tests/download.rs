//! Downloads against a server started on 127.0.0.1 by the test: resume after a cut connection and
//! across runs, a server that ignores `Range`, checksum and size mismatches, 404, retries on 5xx,
//! cancellation, and the lock that pins files without a published sha256 at their first download.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::{Route, Seen, Server, bytes, sha256_hex};
use easyphoto_pipeline::download::part_path;
use easyphoto_pipeline::models::{Locked, fetch_locked, verify};
use easyphoto_pipeline::{
    CancelToken, Downloader, Lock, Manifest, ModelFile, PipelineError, Progress, Silent, Verification,
};

const PATH: &str = "/org/weights/resolve/main/unet/model.bin";

/// A one-file manifest entry for `org/weights`, `unet/model.bin`.
fn model(sha256: &str, size: Option<u64>) -> ModelFile {
    let size = size.map(|s| format!("size = {s}\n")).unwrap_or_default();
    let text = format!(
        "[[model]]\nname = \"weights\"\nrole = \"test\"\nflows = [\"infer\"]\npath = \"sub/model.bin\"\nrepo = \"org/weights\"\n\
         file = \"unet/model.bin\"\nrevision = \"main\"\n{size}approx_size = \"300 kB\"\nsha256 = \"{sha256}\"\nlicense = \"test\"\n"
    );
    Manifest::parse(&text).unwrap().models()[0].clone()
}

fn downloader(server: &Server) -> Downloader {
    Downloader::new(&server.base).with_retries(3, Duration::from_millis(10))
}

/// Files left anywhere under `dir`, as paths relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_cut_connection_is_resumed_with_a_range_request() {
    let body = bytes(300_000, 1);
    let server = Server::start();
    server.route(PATH, Route { body: body.clone(), cut: vec![100_000], ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model(&sha256_hex(&body), Some(body.len() as u64));
    let events = Mutex::new(Vec::new());
    let observer = |e: Progress<'_>| events.lock().unwrap().push((e.step, e.total));
    let fetched = downloader(&server).fetch(&m, dir.path(), &observer, &CancelToken::new()).unwrap();

    assert!(fetched.downloaded);
    assert_eq!(fetched.path, dir.path().join("sub/model.bin"));
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    assert_eq!(fetched.sha256.as_deref(), Some(sha256_hex(&body).as_str()));
    assert_eq!(
        server.seen(),
        vec![Seen { path: PATH.into(), range: None }, Seen { path: PATH.into(), range: Some("bytes=100000-".into()) },]
    );
    let events = events.into_inner().unwrap();
    assert_eq!(events.first(), Some(&(0, Some(300_000))));
    assert!(events.contains(&(100_000, Some(300_000))), "the resumed attempt starts at the cut");
    assert_eq!(events.last(), Some(&(300_000, Some(300_000))));
    assert_eq!(files_under(dir.path()), vec!["sub/model.bin"]);

    // Present with the right size: not downloaded again.
    let again = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert!(!again.downloaded);
    assert_eq!(server.seen().len(), 2);
}

#[test]
fn a_partial_file_from_an_earlier_run_is_resumed() {
    let body = bytes(200_000, 2);
    let server = Server::start();
    server.route(PATH, Route { body: body.clone(), ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model(&sha256_hex(&body), None);
    let part = part_path(&m.local_path(dir.path()));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &body[..120_000]).unwrap();

    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    assert_eq!(server.seen(), vec![Seen { path: PATH.into(), range: Some("bytes=120000-".into()) }]);
    assert!(!part.exists());
}

#[test]
fn a_server_that_ignores_range_restarts_the_file_cleanly() {
    let body = bytes(150_000, 3);
    let server = Server::start();
    server.route(PATH, Route { body: body.clone(), ignore_range: true, ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model(&sha256_hex(&body), Some(body.len() as u64));
    // A stale part of the wrong bytes: appending to it would corrupt the file.
    let part = part_path(&m.local_path(dir.path()));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, bytes(50_000, 99)).unwrap();

    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    assert_eq!(server.seen(), vec![Seen { path: PATH.into(), range: Some("bytes=50000-".into()) }]);
    assert_eq!(files_under(dir.path()), vec!["sub/model.bin"]);
}

#[test]
fn a_cut_connection_on_a_server_that_ignores_range_still_completes() {
    let body = bytes(120_000, 4);
    let server = Server::start();
    server.route(PATH, Route { body: body.clone(), cut: vec![70_000, 30_000], ignore_range: true, ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model(&sha256_hex(&body), None);
    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    assert_eq!(server.seen().len(), 3);
}

#[test]
fn a_checksum_mismatch_leaves_no_file() {
    let body = bytes(64_000, 5);
    let server = Server::start();
    server.route(PATH, Route { body: body.clone(), ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let wrong = sha256_hex(b"something else");
    let m = model(&wrong, None);
    match downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()) {
        Err(PipelineError::ChecksumMismatch { file, expected, actual }) => {
            assert_eq!(file, "weights");
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256_hex(&body));
        }
        other => panic!("{other:?}"),
    }
    assert!(!m.local_path(dir.path()).exists());
    assert!(files_under(dir.path()).is_empty(), "{:?}", files_under(dir.path()));
}

#[test]
fn a_size_mismatch_leaves_no_file() {
    let body = bytes(10_000, 6);
    let server = Server::start();
    server.route(PATH, Route { body, ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model("unknown", Some(12_345));
    let err = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap_err();
    assert!(matches!(err, PipelineError::SizeMismatch { expected: 12_345, actual: 10_000, .. }), "{err:?}");
    assert!(files_under(dir.path()).is_empty());
}

#[test]
fn not_found_names_the_file_and_is_not_retried() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let m = model("unknown", None);
    let err = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap_err();
    match &err {
        PipelineError::NotFound { file, url } => {
            assert_eq!(file, "weights");
            assert_eq!(*url, format!("{}{PATH}", server.base));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("HTTP 404"), "{err}");
    assert_eq!(server.seen().len(), 1);
    assert!(files_under(dir.path()).is_empty());
}

#[test]
fn server_errors_are_retried_then_reported() {
    let server = Server::start();
    server.route(PATH, Route { status: Some(503), ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model("unknown", None);
    let err = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap_err();
    match &err {
        PipelineError::Network { file, attempts, message, .. } => {
            assert_eq!((file.as_str(), *attempts, message.as_str()), ("weights", 4, "HTTP 503"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen().len(), 4, "1 attempt + 3 retries");

    server.route(PATH, Route { status: Some(403), ..Route::default() });
    let err = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap_err();
    assert!(matches!(err, PipelineError::HttpStatus { status: 403, .. }), "{err:?}");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
}

#[test]
fn an_unreachable_endpoint_is_a_network_error() {
    let free_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let d = Downloader::new(&format!("http://127.0.0.1:{free_port}")).with_retries(1, Duration::from_millis(1));
    let err = d.fetch(&model("unknown", None), dir.path(), &Silent, &CancelToken::new()).unwrap_err();
    assert!(matches!(err, PipelineError::Network { attempts: 2, .. }), "{err:?}");
}

#[test]
fn cancel_keeps_the_part_and_a_later_fetch_resumes_it() {
    let body = bytes(2_000_000, 7);
    let server = Server::start();
    server.route(PATH, Route { body: body.clone(), ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model(&sha256_hex(&body), Some(body.len() as u64));
    let cancel = CancelToken::new();
    let observer = |e: Progress<'_>| {
        if e.step > 0 {
            cancel.cancel();
        }
    };
    let err = downloader(&server).fetch(&m, dir.path(), &observer, &cancel).unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled { .. }), "{err:?}");
    let part = part_path(&m.local_path(dir.path()));
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < body.len() as u64, "{kept}");
    assert!(!m.local_path(dir.path()).exists());

    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    assert_eq!(server.seen().last().unwrap().range, Some(format!("bytes={kept}-")));
}

#[test]
fn ranges_survive_the_redirect_to_the_file_host() {
    let body = bytes(100_000, 8);
    let server = Server::start();
    server.route(PATH, Route { redirect: Some(format!("{}/cdn/blob", server.base)), ..Route::default() });
    server.route("/cdn/blob", Route { body: body.clone(), cut: vec![30_000], ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model(&sha256_hex(&body), Some(body.len() as u64));
    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    let seen = server.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3], Seen { path: "/cdn/blob".into(), range: Some("bytes=30000-".into()) });
}

#[test]
fn a_disk_error_names_the_path() {
    let server = Server::start();
    server.route(PATH, Route { body: bytes(1000, 9), ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    // The file's folder cannot be created: a file stands in its place.
    std::fs::write(dir.path().join("sub"), b"not a folder").unwrap();
    match downloader(&server).fetch(&model("unknown", None), dir.path(), &Silent, &CancelToken::new()) {
        Err(PipelineError::Io { path, .. }) => assert_eq!(path, dir.path().join("sub")),
        other => panic!("{other:?}"),
    }
    assert!(server.seen().is_empty(), "nothing is requested when the file cannot be written");
}

#[test]
fn a_part_at_or_past_the_end_is_kept_only_when_it_is_the_whole_file() {
    let body = bytes(40_000, 10);
    let server = Server::start();
    server.route(PATH, Route { body: body.clone(), ..Route::default() });
    let m = model("unknown", None);

    // A complete part from a run killed before its rename: the server answers 416, nothing to fetch.
    let dir = tempfile::tempdir().unwrap();
    let part = part_path(&m.local_path(dir.path()));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &body).unwrap();
    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    assert_eq!(fetched.sha256.as_deref(), Some(sha256_hex(&body).as_str()));

    // A part longer than the file is junk: deleted and downloaded again.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(part_path(&m.local_path(dir.path())).parent().unwrap()).unwrap();
    std::fs::write(part_path(&m.local_path(dir.path())), bytes(50_000, 12)).unwrap();
    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    let ranges: Vec<_> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(ranges, [Some("bytes=40000-".into()), Some("bytes=50000-".into()), None]);
}

#[test]
fn a_part_of_an_older_version_is_not_completed_with_the_newer_one() {
    let (v1, v2) = (bytes(80_000, 13), bytes(80_000, 14));
    let server = Server::start();
    server.route(PATH, Route { body: v1.clone(), cut: vec![30_000], etag: Some("\"v1\"".into()), ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model("unknown", None);
    let once = Downloader::new(&server.base).with_retries(0, Duration::from_millis(1));
    assert!(matches!(once.fetch(&m, dir.path(), &Silent, &CancelToken::new()), Err(PipelineError::Network { .. })));
    let part = part_path(&m.local_path(dir.path()));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 30_000);

    // Same version: resumed, with If-Range naming it.
    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), v1);
    assert_eq!(server.if_ranges(), [None, Some("\"v1\"".into())]);
    assert_eq!(server.seen()[1].range.as_deref(), Some("bytes=30000-"));
    assert_eq!(files_under(dir.path()), vec!["sub/model.bin"], "no part or etag left");

    // The file changed upstream between two runs: the old part is not completed with new bytes.
    std::fs::remove_file(&fetched.path).unwrap();
    server.route(PATH, Route { body: v1.clone(), cut: vec![30_000], etag: Some("\"v1\"".into()), ..Route::default() });
    assert!(once.fetch(&m, dir.path(), &Silent, &CancelToken::new()).is_err());
    server.route(PATH, Route { body: v2.clone(), etag: Some("\"v2\"".into()), ..Route::default() });
    let fetched = downloader(&server).fetch(&m, dir.path(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), v2);
    assert_eq!(server.if_ranges().last().unwrap().as_deref(), Some("\"v1\""));
}

#[test]
fn a_file_without_a_published_sha256_is_pinned_at_its_first_download() {
    let (first, second) = (bytes(200_000, 21), bytes(200_000, 22));
    let server = Server::start();
    server.route(PATH, Route { body: first.clone(), ..Route::default() });
    let dir = tempfile::tempdir().unwrap();
    let m = model("unknown", None);
    let dest = m.local_path(dir.path());
    let check = |lock: &Lock| verify(&m, dir.path(), lock, &Silent, &CancelToken::new()).unwrap();

    // The first download is recorded in models.lock, which a later run reads back.
    let mut lock = Lock::load(dir.path()).unwrap();
    assert_eq!(check(&lock), Verification::Missing);
    let fetched = fetch_locked(&downloader(&server), &m, dir.path(), &mut lock, &Silent, &CancelToken::new()).unwrap();
    assert!(fetched.downloaded);
    let recorded = Locked { size: 200_000, sha256: sha256_hex(&first), url: format!("{}{PATH}", server.base) };
    assert_eq!(lock.get("weights"), Some(&recorded));
    let text = std::fs::read_to_string(dir.path().join("models.lock")).unwrap();
    assert!(text.starts_with("# The size and sha256") && text.contains(&sha256_hex(&first)), "{text}");
    let lock = Lock::load(dir.path()).unwrap();
    assert_eq!(lock.get("weights"), Some(&recorded));
    assert_eq!(check(&lock), Verification::Locked { sha256: sha256_hex(&first) });

    // From now on the file is checked against the record: changed bytes, a truncated file.
    let mut changed = first.clone();
    changed[123_456] ^= 1;
    std::fs::write(&dest, &changed).unwrap();
    assert_eq!(
        check(&lock),
        Verification::WrongChecksum { expected: sha256_hex(&first), actual: sha256_hex(&changed) }
    );
    std::fs::write(&dest, &first[..150_000]).unwrap();
    assert_eq!(check(&lock), Verification::WrongSize { expected: 200_000, actual: 150_000 });

    // A new version served under the same name is refused, not silently accepted.
    std::fs::remove_file(&dest).unwrap();
    server.route(PATH, Route { body: second.clone(), ..Route::default() });
    let mut lock = Lock::load(dir.path()).unwrap();
    match fetch_locked(&downloader(&server), &m, dir.path(), &mut lock, &Silent, &CancelToken::new()) {
        Err(PipelineError::ChecksumMismatch { expected, actual, .. }) => {
            assert_eq!((expected, actual), (sha256_hex(&first), sha256_hex(&second)));
        }
        other => panic!("{other:?}"),
    }
    assert!(!dest.exists() && !part_path(&dest).exists());
    assert_eq!(Lock::load(dir.path()).unwrap().get("weights"), Some(&recorded));

    // A manifest that publishes the sha256 needs no record.
    let other = tempfile::tempdir().unwrap();
    server.route(PATH, Route { body: first.clone(), ..Route::default() });
    let pinned = model(&sha256_hex(&first), None);
    let mut lock = Lock::load(other.path()).unwrap();
    fetch_locked(&downloader(&server), &pinned, other.path(), &mut lock, &Silent, &CancelToken::new()).unwrap();
    assert_eq!(lock.get("weights"), None);
    assert!(!other.path().join("models.lock").exists());
}

#[test]
fn a_file_put_in_place_by_hand_is_unpinned_if_its_size_is_plausible() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("unknown", None);
    let lock = Lock::load(dir.path()).unwrap();
    let dest = m.local_path(dir.path());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    // About 300 kB: 160 kB passes, 9 bytes (an error page, a cut download) does not.
    let body = bytes(160_000, 5);
    std::fs::write(&dest, &body).unwrap();
    let check = || verify(&m, dir.path(), &lock, &Silent, &CancelToken::new()).unwrap();
    assert_eq!(check(), Verification::Unpinned { sha256: sha256_hex(&body), size: 160_000 });
    assert!(check().is_usable());
    std::fs::write(&dest, b"Not Found").unwrap();
    assert_eq!(check(), Verification::ImplausibleSize { approx: "300 kB".into(), actual: 9 });
    assert!(!check().is_usable());
    std::fs::write(&dest, bytes(700_000, 5)).unwrap();
    assert!(matches!(check(), Verification::ImplausibleSize { actual: 700_000, .. }));

    // A lock file that does not parse is refused, naming it.
    for text in ["[weights]\nsize = 1\n", "[weights]\nsize = 1\nsha256 = \"abc\"\nurl = \"u\"\n"] {
        std::fs::write(dir.path().join("models.lock"), text).unwrap();
        match Lock::load(dir.path()) {
            Err(PipelineError::InvalidInput { path, .. }) => assert_eq!(path, dir.path().join("models.lock")),
            other => panic!("{other:?}"),
        }
    }
}
