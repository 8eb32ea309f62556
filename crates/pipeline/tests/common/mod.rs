//! A small HTTP/1.1 file server on 127.0.0.1 for the download tests: serves byte ranges, and can
//! cut a response short, ignore `Range`, or fail, to exercise the downloader's recovery paths.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the server answers one path.
#[derive(Clone, Default)]
pub struct Route {
    pub body: Vec<u8>,
    /// The first `cut.len()` requests send only this many bytes of their body, then close.
    pub cut: Vec<usize>,
    /// Answer 200 with the whole body even when a range is asked for.
    pub ignore_range: bool,
    /// Answer every request with this status and no body.
    pub status: Option<u16>,
    /// Answer `302 Found` pointing here (as the Hugging Face hub does towards its CDN).
    pub redirect: Option<String>,
    /// Sent as `ETag`; an `If-Range` naming another version gets the whole body (200).
    pub etag: Option<String>,
}

/// One request as the server saw it: path and `Range` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

pub struct Server {
    pub base: String,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    if_ranges: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let if_ranges: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (routes, seen, if_ranges, stop) = (routes.clone(), seen.clone(), if_ranges.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = serve(stream, &routes, &seen, &if_ranges);
                    }
                }
            })
        };
        Self { base, routes, seen, if_ranges, stop, thread: Some(thread) }
    }

    pub fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.to_string(), route);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The `If-Range` header of every request, in order.
    pub fn if_ranges(&self) -> Vec<Option<String>> {
        self.if_ranges.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.base.trim_start_matches("http://"));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    mut stream: TcpStream,
    routes: &Mutex<HashMap<String, Route>>,
    seen: &Mutex<Vec<Seen>>,
    if_ranges: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    let mut if_range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_string());
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("if-range")
        {
            if_range = Some(value.trim().to_string());
        }
    }
    seen.lock().unwrap().push(Seen { path: path.clone(), range: range.clone() });
    if_ranges.lock().unwrap().push(if_range.clone());
    let mut routes = routes.lock().unwrap();
    let Some(route) = routes.get_mut(&path) else {
        return stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    if let Some(location) = &route.redirect {
        return stream.write_all(
            format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
    }
    if let Some(status) = route.status {
        return stream.write_all(
            format!("HTTP/1.1 {status} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        );
    }
    let len = route.body.len();
    let etag = route.etag.as_ref().map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
    let start = range
        .as_deref()
        .filter(|_| !route.ignore_range && (if_range.is_none() || if_range == route.etag))
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse::<usize>().ok());
    let head = match start {
        Some(s) if s >= len => {
            return stream.write_all(
                format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
        Some(s) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\nContent-Length: {}\r\n{etag}Connection: close\r\n\r\n",
            len - 1,
            len - s
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n{etag}Connection: close\r\n\r\n"),
    };
    let start = start.unwrap_or(0);
    let end = if route.cut.is_empty() { len } else { (start + route.cut.remove(0)).min(len) };
    stream.write_all(head.as_bytes())?;
    stream.write_all(&route.body[start..end])?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}

/// Deterministic bytes that are not a repeating pattern (so an offset error changes the hash).
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// The sha256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}
