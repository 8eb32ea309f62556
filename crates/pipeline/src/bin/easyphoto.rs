//! `easyphoto`: the command line of easyphoto-rs (see `easyphoto --help`).

use clap::Parser;
use easyphoto_pipeline::cli::{Cli, run};
use easyphoto_pipeline::progress::{CancelToken, ProgressBars};

fn main() -> std::process::ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { easyphoto_diffusion::cpu::serial_candle_pool() };
    let cli = Cli::parse();
    // Freed model outputs stay in the heap for the next op (see the diffusion crate's cpu::alloc).
    easyphoto_diffusion::cpu::keep_freed_memory();
    let bars = ProgressBars::new();
    match run(&cli, &mut std::io::stdout(), &bars, &CancelToken::new()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
