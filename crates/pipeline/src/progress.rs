//! Progress reports and cancellation, shared by the downloads and the flows: a long step reports
//! `(stage, step, total, message)` to an [`Observer`] and polls a [`CancelToken`] between units
//! of work, so a CLI can draw bars and a server can stream the same events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{PipelineError, Result};

/// One progress event: `step` of `total` units done in `stage` (bytes for a download, sampler
/// steps for a diffusion). `total` is `None` when it is not known in advance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    pub stage: &'a str,
    pub step: u64,
    pub total: Option<u64>,
    pub message: &'a str,
}

/// Receives progress events; called from the working thread, so keep it cheap.
pub trait Observer: Send + Sync {
    fn progress(&self, event: Progress<'_>);
}

/// Ignores every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {
    fn progress(&self, _: Progress<'_>) {}
}

/// Calls a closure for every event.
impl<F: Fn(Progress<'_>) + Send + Sync> Observer for F {
    fn progress(&self, event: Progress<'_>) {
        self(event)
    }
}

/// A cancellation flag shared between the caller and the work; clones share one flag.
#[derive(Debug, Default, Clone)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the work to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled { stage })` once [`cancel`](Self::cancel) was called.
    pub fn check(&self, stage: &str) -> Result<()> {
        if self.is_cancelled() {
            return Err(PipelineError::Cancelled { stage: stage.to_string() });
        }
        Ok(())
    }
}

/// Draws one terminal progress bar per `(stage, message)` with indicatif.
#[cfg(feature = "cli")]
#[derive(Default)]
pub struct ProgressBars {
    current: std::sync::Mutex<Option<(String, indicatif::ProgressBar)>>,
}

#[cfg(feature = "cli")]
impl ProgressBars {
    pub fn new() -> Self {
        Self::default()
    }

    fn new_bar(event: &Progress<'_>) -> indicatif::ProgressBar {
        let bytes = [crate::download::STAGE, crate::download::VERIFY_STAGE].contains(&event.stage);
        let (bar, template) = match event.total {
            Some(total) if bytes => (
                indicatif::ProgressBar::new(total),
                "{prefix} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ),
            Some(total) => (indicatif::ProgressBar::new(total), "{prefix} {msg} [{bar:30}] {pos}/{len} eta {eta}"),
            None if bytes => {
                (indicatif::ProgressBar::new_spinner(), "{prefix} {msg} {spinner} {bytes} {bytes_per_sec}")
            }
            None => (indicatif::ProgressBar::new_spinner(), "{prefix} {msg} {spinner} {pos}"),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(event.stage.to_string());
        bar.set_message(event.message.to_string());
        bar
    }
}

#[cfg(feature = "cli")]
impl Observer for ProgressBars {
    fn progress(&self, event: Progress<'_>) {
        let Ok(mut current) = self.current.lock() else { return };
        let key = format!("{}\0{}", event.stage, event.message);
        if current.as_ref().is_none_or(|(k, _)| *k != key) {
            if let Some((_, old)) = current.take() {
                old.finish();
            }
            *current = Some((key, Self::new_bar(&event)));
        }
        if let Some((_, bar)) = current.as_ref() {
            if let Some(total) = event.total {
                bar.set_length(total);
            }
            bar.set_position(event.step);
            if event.total.is_some_and(|t| event.step >= t) {
                bar.finish();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_token_is_shared_by_clones() {
        let token = CancelToken::new();
        let other = token.clone();
        token.check("download").unwrap();
        other.cancel();
        assert!(token.is_cancelled());
        match token.check("download") {
            Err(PipelineError::Cancelled { stage }) => assert_eq!(stage, "download"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn closures_observe_events() {
        let seen = std::sync::Mutex::new(Vec::new());
        let observer = |e: Progress<'_>| seen.lock().unwrap().push((e.stage.to_string(), e.step, e.total));
        observer.progress(Progress { stage: "train", step: 3, total: Some(800), message: "" });
        assert_eq!(*seen.lock().unwrap(), vec![("train".to_string(), 3, Some(800))]);
    }
}
