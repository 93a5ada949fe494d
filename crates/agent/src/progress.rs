//! The progress bar an epoch with much to send shows on a terminal.

use crate::AgentConfig;

/// Epochs with less than this to send show no progress bar.
const PROGRESS_MIN_BYTES: u64 = 64 * 1024 * 1024;

/// A bar for an epoch of `bytes` to send, when `--progress` asks for one
/// and the epoch is large enough to want it.
pub(crate) fn progress_bar(config: &AgentConfig, bytes: u64) -> Option<indicatif::ProgressBar> {
    if !config.progress || bytes < PROGRESS_MIN_BYTES {
        return None;
    }
    let bar = indicatif::ProgressBar::new(bytes);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_message(format!("replicating {}", config.source));
    Some(bar)
}
