//! Write capture as the server sees it: the figures an agent in capture mode
//! (`agent --serve`) reports in a `Capture` frame before each complete
//! `Commit`, kept per source for `status`, the JSON API and `/metrics`.
//!
//! The server answers nothing to a `Capture` frame and checks nothing in it
//! beyond its encoding: the figures only describe the agent's own source, so
//! a lying agent can only mislead about itself. A source is in mode
//! `capture` from the first report of a session on, and goes back to `scan`
//! when a session commits a complete epoch without having reported; the last
//! report is kept after the agent disconnects (the source's
//! `seconds_since_contact` says how old it is).
//!
//! The agent's counters start from 0 when it restarts. `/metrics` exports
//! counters that never go backwards within a server process, so the server
//! adds up the increases between reports, counting a report whose counter is
//! below the previous one as a restart (its whole value is new).

use blockrep_proto::Message;
use serde::{Deserialize, Serialize};

/// A source's write-capture figures, as its agent last reported them (the
/// `capture` object of the JSON API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureView {
    /// Bytes written by the workload and not yet in a committed epoch.
    pub dirty_bytes: u64,
    /// Bytes of old content held for the cut in flight.
    pub preserved_bytes: u64,
    /// Epochs cut since the agent started.
    pub cuts: u64,
    /// Writes the workload made through the agent's export since it started.
    pub writes: u64,
    /// Median write latency the workload saw since the previous report, µs.
    pub write_p50_us: u64,
    /// 99th percentile write latency since the previous report, µs.
    pub write_p99_us: u64,
}

/// Replication mode of a source: how its agent finds what changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceMode {
    /// The agent scans the disk every epoch (the default).
    #[default]
    Scan,
    /// The agent sits in the disk's write path and sends what was written.
    Capture,
}

impl SourceMode {
    /// The mode's name as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceMode::Scan => "scan",
            SourceMode::Capture => "capture",
        }
    }
}

/// What the server keeps of a source's capture reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CaptureRecord {
    /// The last report.
    pub last: CaptureView,
    /// Cuts reported since the server started, across agent restarts.
    pub cuts_total: u64,
    /// Writes reported since the server started, across agent restarts.
    pub writes_total: u64,
}

/// The increase of an agent counter from `previous` to `now`: all of `now`
/// when it went down (the agent restarted and counts from 0 again).
fn increase(previous: u64, now: u64) -> u64 {
    if now >= previous { now - previous } else { now }
}

impl CaptureRecord {
    /// What is kept after a report of `view`, given what was kept before
    /// (`None`: the first report since the server started, or since the
    /// source was last scanned).
    pub(crate) fn reported(previous: Option<CaptureRecord>, view: CaptureView) -> Self {
        let mut kept = previous.unwrap_or_default();
        let last = previous.map(|c| c.last).unwrap_or_default();
        kept.cuts_total = kept
            .cuts_total
            .saturating_add(increase(last.cuts, view.cuts));
        kept.writes_total = kept
            .writes_total
            .saturating_add(increase(last.writes, view.writes));
        kept.last = view;
        kept
    }
}

impl CaptureView {
    /// The figures of a `Capture` frame; `None` for any other message.
    pub(crate) fn from_message(message: &Message) -> Option<Self> {
        match *message {
            Message::Capture {
                dirty_bytes,
                preserved_bytes,
                cuts,
                writes,
                write_p50_us,
                write_p99_us,
            } => Some(Self {
                dirty_bytes,
                preserved_bytes,
                cuts,
                writes,
                write_p50_us,
                write_p99_us,
            }),
            _ => None,
        }
    }
}

impl SourceMode {
    /// The mode of a source with these capture figures (`None`: scanned).
    pub(crate) fn of(capture: Option<&CaptureRecord>) -> Self {
        if capture.is_some() {
            SourceMode::Capture
        } else {
            SourceMode::Scan
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(cuts: u64, writes: u64) -> CaptureView {
        CaptureView {
            cuts,
            writes,
            ..CaptureView::default()
        }
    }

    #[test]
    fn counters_add_up_across_agent_restarts() {
        let mut record: Option<CaptureRecord> = None;
        assert_eq!(SourceMode::of(record.as_ref()), SourceMode::Scan);
        for reported in [view(3, 100), view(5, 150), view(1, 20)] {
            // The third report: the agent restarted, its counters begin again.
            record = Some(CaptureRecord::reported(record, reported));
        }
        let capture = record.unwrap();
        assert_eq!(capture.cuts_total, 6);
        assert_eq!(capture.writes_total, 170);
        assert_eq!(capture.last, view(1, 20));
        assert_eq!(SourceMode::of(record.as_ref()), SourceMode::Capture);
        // A complete scanned epoch drops the figures (see the session's commit).
        record = None;
        assert_eq!(SourceMode::of(record.as_ref()), SourceMode::Scan);
        assert!(record.is_none());
    }

    #[test]
    fn only_capture_frames_carry_capture_figures() {
        let frame = Message::Capture {
            dirty_bytes: 1,
            preserved_bytes: 2,
            cuts: 3,
            writes: 4,
            write_p50_us: 5,
            write_p99_us: 6,
        };
        assert_eq!(CaptureView::from_message(&frame).unwrap().write_p99_us, 6);
        assert!(CaptureView::from_message(&Message::GetPages { indices: vec![] }).is_none());
    }
}
