//! Live progress of a run. The durable part lives on the run row (`records_ingested`,
//! `records_rejected`, `heartbeat_at`, updated in each batch's transaction), so `connectors` and
//! `connectorRuns` show a sync in progress from any process. This module adds what a terminal
//! shows during `healthd sync`: a progress bar on a TTY, plain periodic lines otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ingest::WriteTotals;

/// How a run reports progress locally.
pub enum Progress {
    /// Nothing (background runs: the run row is enough).
    Silent,
    /// An `indicatif` spinner with records, rate and rejections.
    Bar(indicatif::ProgressBar),
    /// A line on stderr at most every `every`.
    Lines {
        every: Duration,
        last: Mutex<Instant>,
    },
}

impl Progress {
    /// A bar when stderr is a terminal, else plain lines every 5 s.
    pub fn for_terminal(name: &str) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {prefix} {elapsed_precise} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.set_prefix(name.to_string());
            bar.set_message("starting");
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                every: Duration::from_secs(5),
                last: Mutex::new(Instant::now()),
            }
        }
    }

    /// Reports the totals after a committed batch; `elapsed` since the run started.
    pub fn update(&self, totals: &WriteTotals, elapsed: Duration) {
        match self {
            Progress::Silent => {}
            Progress::Bar(bar) => bar.set_message(describe(totals, elapsed)),
            Progress::Lines { every, last } => {
                let Ok(mut last) = last.lock() else { return };
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    eprintln!("  {}", describe(totals, elapsed));
                }
            }
        }
    }

    /// Clears the bar before the summary is printed.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// `12,345 records (4,100/s), 3 rejected`.
pub fn describe(totals: &WriteTotals, elapsed: Duration) -> String {
    format!(
        "{} records ({}/s), {} rejected",
        group(totals.records),
        group(rate(totals.records, elapsed) as u64),
        group(totals.rejections)
    )
}

/// Records per second.
pub fn rate(records: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        records as f64 / secs
    }
}

/// `1234567` -> `1,234,567`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
        let t = WriteTotals {
            records: 5000,
            rejections: 2,
            ..Default::default()
        };
        assert_eq!(
            describe(&t, Duration::from_secs(2)),
            "5,000 records (2,500/s), 2 rejected"
        );
    }
}
