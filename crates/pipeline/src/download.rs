//! Downloads of manifest files over HTTP(S), made for large files on bad links (EasyPhoto's most
//! frequent complaints are failed and partial downloads).
//!
//! A file is downloaded into `<path>.part` beside its final place, resumed with an HTTP `Range`
//! request after an interruption (within the run, and across runs), restarted from zero when the
//! server ignores the range, checked (size, sha256) and only then renamed into place, so the final
//! path only ever holds a complete, checked file. The server's `ETag` is kept beside the part
//! (`<path>.part.etag`) and sent back as `If-Range`, so a part of an older version of the file is
//! never completed with bytes of a newer one: the server then sends the whole new file. Transient failures (connection errors, HTTP 5xx
//! and 429) are retried with a growing pause; an attempt that made progress resets the count.
//!
//! Plain `ureq` rather than `hf-hub`: hf-hub has a custom endpoint (`with_endpoint`, `HF_ENDPOINT`),
//! tokens and retries, but stores files in its own cache layout (`blobs/`, `snapshots/` per repo),
//! and 1.0 is built on tokio and reqwest. We need a models directory that users can also fill by
//! hand, a sha256 check before the rename, our progress observer and cancel token, and one small
//! blocking client; the URL scheme stays the hub's, so mirrors work the same.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};
use crate::models::{Checksum, ModelFile};
use crate::progress::{CancelToken, Observer, Progress};

/// The stage name of download progress events (bytes).
pub const STAGE: &str = "download";
/// The stage name of checksum progress events (bytes).
pub const VERIFY_STAGE: &str = "sha256";

const CHUNK: usize = 1 << 18;

/// What [`Downloader::fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub size: u64,
    /// The file's sha256 (computed; equal to the manifest's where it has one). `None` when the
    /// file was already in place and not re-read.
    pub sha256: Option<String>,
    /// False when the file was already in place.
    pub downloaded: bool,
}

/// Downloads manifest files from one endpoint.
#[derive(Debug, Clone)]
pub struct Downloader {
    endpoint: String,
    agent: ureq::Agent,
    token: Option<String>,
    retries: u32,
    pause: Duration,
}

/// How one attempt ended when it did not complete.
enum Failure {
    /// Worth another attempt (network error, 5xx); the message says what happened.
    Retry(String),
    Fatal(PipelineError),
}

impl Downloader {
    /// A downloader for `endpoint` (e.g. [`DEFAULT_ENDPOINT`](crate::models::DEFAULT_ENDPOINT)),
    /// with 5 retries, 30 s connect and 60 s read timeouts.
    pub fn new(endpoint: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("easyphoto-rs/", env!("CARGO_PKG_VERSION")))
            .build();
        Self { endpoint: endpoint.to_string(), agent, token: None, retries: 5, pause: Duration::from_secs(2) }
    }

    /// Sends `Authorization: Bearer <token>` (gated repositories); not sent on to redirect targets.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Retries after failed attempts without progress, pausing `pause × attempt` before each.
    pub fn with_retries(mut self, retries: u32, pause: Duration) -> Self {
        self.retries = retries;
        self.pause = pause;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Downloads `model` to its place under `models_dir` unless it is there already (with the
    /// manifest's size, where known; [`verify`](crate::models::verify) re-reads contents).
    pub fn fetch(
        &self,
        model: &ModelFile,
        models_dir: &Path,
        observer: &dyn Observer,
        cancel: &CancelToken,
    ) -> Result<Fetched> {
        let dest = model.local_path(models_dir);
        if let Ok(meta) = std::fs::metadata(&dest)
            && meta.is_file()
            && model.size.is_none_or(|s| s == meta.len())
        {
            return Ok(Fetched { path: dest, size: meta.len(), sha256: None, downloaded: false });
        }
        let part = part_path(&dest);
        let dir = dest.parent().unwrap_or(models_dir);
        std::fs::create_dir_all(dir).map_err(|source| PipelineError::Io { path: dir.to_path_buf(), source })?;
        let url = model.url(&self.endpoint);
        let mut failures = 0;
        loop {
            cancel.check(STAGE)?;
            let before = file_len(&part);
            match self.attempt(model, &url, &part, observer, cancel) {
                Ok(()) => break,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(message)) => {
                    failures = if file_len(&part) > before { 1 } else { failures + 1 };
                    if failures > self.retries {
                        return Err(PipelineError::Network {
                            file: model.name.clone(),
                            url,
                            attempts: failures,
                            message,
                        });
                    }
                    std::thread::sleep(self.pause * failures);
                }
            }
        }
        let sha256 = self.check(model, &part)?;
        let size = file_len(&part);
        std::fs::rename(&part, &dest).map_err(|source| PipelineError::Io { path: dest.clone(), source })?;
        remove(&etag_path(&part))?;
        Ok(Fetched { path: dest, size, sha256: Some(sha256), downloaded: true })
    }

    /// One request: resumes `part` from its length, or rewrites it when the server sends the
    /// whole file.
    fn attempt(
        &self,
        model: &ModelFile,
        url: &str,
        part: &Path,
        observer: &dyn Observer,
        cancel: &CancelToken,
    ) -> std::result::Result<(), Failure> {
        let fatal = |e| Failure::Fatal(e);
        let io = |source| Failure::Fatal(PipelineError::Io { path: part.to_path_buf(), source });
        let mut offset = file_len(part);
        if let Some(size) = model.size {
            if offset == size {
                return Ok(());
            }
            if offset > size {
                discard(part).map_err(fatal)?;
                offset = 0;
            }
        }
        let mut request = self.agent.get(url);
        if offset > 0 {
            request = request.set("Range", &format!("bytes={offset}-"));
            if let Ok(etag) = std::fs::read_to_string(etag_path(part)) {
                request = request.set("If-Range", etag.trim());
            }
        }
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        let response = match request.call() {
            Ok(response) => response,
            Err(ureq::Error::Status(404, _)) => {
                return Err(fatal(PipelineError::NotFound { file: model.name.clone(), url: url.to_string() }));
            }
            // The range starts at or past the end: the part is the whole file when its length is
            // the one the server reports (`Content-Range: bytes */<length>`), else junk.
            Err(ureq::Error::Status(416, response)) if offset > 0 => {
                if model.size.is_none() && content_range_total(response.header("Content-Range")) == Some(offset) {
                    return Ok(());
                }
                discard(part).map_err(fatal)?;
                return Err(Failure::Retry("the server refused the range; restarting".into()));
            }
            Err(ureq::Error::Status(status, _)) if status == 429 || status >= 500 => {
                return Err(Failure::Retry(format!("HTTP {status}")));
            }
            Err(ureq::Error::Status(status, _)) => {
                return Err(fatal(PipelineError::HttpStatus {
                    file: model.name.clone(),
                    url: url.to_string(),
                    status,
                }));
            }
            Err(ureq::Error::Transport(t)) => return Err(Failure::Retry(t.to_string())),
        };
        let resumed = offset > 0 && response.status() == 206;
        if resumed && content_range_start(response.header("Content-Range")) != Some(offset) {
            discard(part).map_err(fatal)?;
            return Err(Failure::Retry("the server resumed at another offset; restarting".into()));
        }
        let start = if resumed { offset } else { 0 };
        if !resumed {
            // A strong ETag names this version of the file; weak ones may not be used in If-Range.
            match response.header("ETag").filter(|e| !e.starts_with("W/")) {
                Some(etag) => std::fs::write(etag_path(part), etag)
                    .map_err(|source| Failure::Fatal(PipelineError::Io { path: etag_path(part), source }))?,
                None => remove(&etag_path(part)).map_err(fatal)?,
            }
        }
        let body_len = response.header("Content-Length").and_then(|v| v.trim().parse::<u64>().ok());
        let total = body_len.map(|n| n + start).or(model.size);
        let mut file = if resumed {
            OpenOptions::new().append(true).open(part).map_err(io)?
        } else {
            File::create(part).map_err(io)?
        };
        let mut reader = response.into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut done = start;
        observer.progress(Progress { stage: STAGE, step: done, total, message: &model.name });
        loop {
            if cancel.is_cancelled() {
                file.sync_all().map_err(io)?;
                return Err(fatal(PipelineError::Cancelled { stage: STAGE.into() }));
            }
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    file.sync_all().map_err(io)?;
                    return Err(Failure::Retry(format!("connection lost after {done} bytes: {e}")));
                }
            };
            file.write_all(&buf[..n]).map_err(io)?;
            done += n as u64;
            observer.progress(Progress { stage: STAGE, step: done, total, message: &model.name });
        }
        file.sync_all().map_err(io)?;
        match total {
            Some(total) if done < total => {
                Err(Failure::Retry(format!("connection closed after {done} of {total} bytes")))
            }
            _ => Ok(()),
        }
    }

    /// Checks a complete `part` against the manifest; deletes it on a mismatch.
    fn check(&self, model: &ModelFile, part: &Path) -> Result<String> {
        let size = file_len(part);
        if let Some(expected) = model.size.filter(|&s| s != size) {
            discard(part)?;
            return Err(PipelineError::SizeMismatch { file: model.name.clone(), expected, actual: size });
        }
        let actual = sha256_file(part, &model.name, &crate::progress::Silent, &CancelToken::new())?;
        if let Checksum::Sha256(expected) = &model.sha256
            && *expected != actual
        {
            discard(part)?;
            return Err(PipelineError::ChecksumMismatch {
                file: model.name.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        Ok(actual)
    }
}

/// The sha256 of a file as lowercase hex, reporting progress in bytes under [`VERIFY_STAGE`].
pub fn sha256_file(path: &Path, name: &str, observer: &dyn Observer, cancel: &CancelToken) -> Result<String> {
    let read = |source| PipelineError::Read { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(read)?;
    let total = file.metadata().map_err(read)?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    loop {
        cancel.check(VERIFY_STAGE)?;
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        observer.progress(Progress { stage: VERIFY_STAGE, step: done, total: Some(total), message: name });
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `<dest>.part`, the file a download grows in.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `<part>.etag`, the version of the file a part belongs to.
fn etag_path(part: &Path) -> PathBuf {
    let mut name = part.file_name().unwrap_or_default().to_os_string();
    name.push(".etag");
    part.with_file_name(name)
}

/// Deletes a part and its ETag.
fn discard(part: &Path) -> Result<()> {
    remove(part)?;
    remove(&etag_path(part))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PipelineError::Io { path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// The first byte of `Content-Range: bytes <start>-<end>/<total>`.
fn content_range_start(header: Option<&str>) -> Option<u64> {
    header?.trim().strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// The total length of `Content-Range: bytes <range>/<total>` (or `bytes */<total>`).
fn content_range_total(header: Option<&str>) -> Option<u64> {
    header?.rsplit('/').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_and_part_names() {
        assert_eq!(content_range_start(Some("bytes 100-299/300")), Some(100));
        assert_eq!(content_range_start(Some("bytes */300")), None);
        assert_eq!(content_range_start(None), None);
        assert_eq!(content_range_total(Some("bytes */300")), Some(300));
        assert_eq!(content_range_total(Some("bytes 0-9/*")), None);
        assert_eq!(part_path(Path::new("/m/ControlNet/x.pth")), Path::new("/m/ControlNet/x.pth.part"));
    }

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        let sha = sha256_file(&path, "abc", &crate::progress::Silent, &CancelToken::new()).unwrap();
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
