//! Throughput of the sha256 that `easyphoto models verify` and every download run over model
//! files (GBs each). Prints one JSON line; `tools/bench/sha256_compare.sh` runs it beside Python's
//! hashlib (OpenSSL) on the same file.
//!
//! `cargo run --release -p easyphoto-pipeline --example bench_sha256 -- FILE [RUNS]`

use std::time::Instant;

use easyphoto_pipeline::download::sha256_file;
use easyphoto_pipeline::{CancelToken, Silent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().ok_or("usage: bench_sha256 FILE [RUNS]")?);
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(3);
    let size = std::fs::metadata(&path)?.len();
    let mut times = Vec::new();
    let mut digest = String::new();
    for _ in 0..runs {
        let start = Instant::now();
        digest = sha256_file(&path, "bench", &Silent, &CancelToken::new())?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\": \"easyphoto-rs sha2\", \"bytes\": {size}, \"median_s\": {median:.4}, \"mb_per_s\": {:.1}, \"sha256\": \"{digest}\"}}",
        size as f64 / median / 1e6
    );
    Ok(())
}
