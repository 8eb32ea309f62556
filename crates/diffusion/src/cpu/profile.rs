//! Wall-clock time per operation kind, for finding where a forward pass spends its time.
//!
//! Off unless the environment variable `EASYPHOTO_PROFILE` is set when the first timed op runs;
//! then every timed op adds its duration to a per-kind total. Candle's CPU backend is eager and
//! synchronous, so the times are exact. Read the totals with [`report`].

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64, f64)>> = Mutex::new(BTreeMap::new());

/// Whether profiling is on (`EASYPHOTO_PROFILE` set).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("EASYPHOTO_PROFILE").is_some())
}

/// Times the scope it lives in under `kind` (nothing when profiling is off).
#[must_use]
pub struct Scope(Option<(&'static str, Instant, f64)>);

/// Starts timing one op of `kind`; the time is recorded when the returned guard drops.
pub fn scope(kind: &'static str) -> Scope {
    scope_flops(kind, 0.0)
}

/// [`scope`] for an op doing `flops` floating-point operations (the report shows GFLOP/s).
pub fn scope_flops(kind: &'static str, flops: f64) -> Scope {
    Scope(enabled().then(|| (kind, Instant::now(), flops)))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((kind, start, flops)) = self.0.take() {
            let elapsed = start.elapsed();
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let entry = totals.entry(kind).or_default();
            entry.0 += elapsed;
            entry.1 += 1;
            entry.2 += flops;
        }
    }
}

/// The totals so far, `(kind, time, calls, flops)`, longest first.
pub fn totals() -> Vec<(&'static str, Duration, u64, f64)> {
    let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = totals.iter().map(|(k, (d, n, f))| (*k, *d, *n, *f)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (Linux; zero
/// elsewhere). On a loaded machine, CPU time divided by the thread count estimates the wall time
/// the same work would take on an idle one.
pub fn process_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime (fields 14 and 15 of stat) are at 11 and 12 after the name; 100 ticks/s.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Clears the totals.
pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The totals as a table, with the share of `wall` each kind took and the untimed rest.
pub fn report(wall: Duration) -> String {
    let mut out = String::new();
    let mut timed = Duration::ZERO;
    for (kind, d, n, flops) in totals() {
        timed += d;
        let pct = 100.0 * d.as_secs_f64() / wall.as_secs_f64();
        out += &format!("{kind:<24} {:>9.1} ms {pct:>5.1}% {n:>5} calls", d.as_secs_f64() * 1e3);
        if flops > 0.0 {
            out += &format!(" {:>7.1} GFLOP {:>6.1} GFLOP/s", flops / 1e9, flops / 1e9 / d.as_secs_f64());
        }
        out += "\n";
    }
    let rest = wall.saturating_sub(timed);
    let pct = 100.0 * rest.as_secs_f64() / wall.as_secs_f64();
    out += &format!("{:<24} {:>9.1} ms {pct:>5.1}%\n", "(untimed rest)", rest.as_secs_f64() * 1e3);
    out += &format!("{:<24} {:>9.1} ms\n", "wall", wall.as_secs_f64() * 1e3);
    out
}
