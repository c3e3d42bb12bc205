//! A live progress line for `cutover run` on a terminal: per-table snapshot progress, then
//! phase, lag and throughput while streaming. Off when stderr is not a terminal (logs stay
//! clean for files and journald).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::status::{Phase, StatusHandle};

/// Render `status` on stderr until the task is aborted. Returns `None` off a terminal.
pub fn spawn(status: StatusHandle) -> Option<tokio::task::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(tokio::spawn(async move {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let style = ProgressStyle::with_template("{prefix:>28} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let head = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
        let mut bars: Vec<ProgressBar> = Vec::new();
        loop {
            let s = status.snapshot();
            head.set_prefix(s.job.clone());
            let lag = match (s.lag_bytes, s.lag_seconds) {
                (Some(b), Some(t)) => format!("lag {} ({t:.1}s)", human_bytes(b)),
                _ => "lag ?".to_string(),
            };
            head.set_message(format!(
                "{:?} · applied {} · {} txns, {} rows · {lag}",
                s.phase,
                s.applied_lsn.as_deref().unwrap_or("-"),
                s.applied_transactions,
                s.applied_rows
            ));
            if s.phase == Phase::Snapshot {
                while bars.len() < s.tables.len() {
                    bars.push(multi.add(ProgressBar::new_spinner().with_style(style.clone())));
                }
                for (bar, t) in bars.iter().zip(&s.tables) {
                    bar.set_prefix(t.source.clone());
                    bar.set_message(format!(
                        "{} rows, {}{}",
                        t.rows_copied,
                        human_bytes(t.bytes_copied),
                        if t.snapshot_done { " · done" } else { "" }
                    ));
                }
            } else {
                for bar in bars.drain(..) {
                    bar.finish_and_clear();
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }))
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
