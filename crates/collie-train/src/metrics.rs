//! Monitors: `metrics.jsonl`, throughput, MFU, memory, and the progress display.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

use crate::error::TrainError;

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Current resident set size of this process in bytes (Linux `VmRSS`), if known.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Dense bf16 peak TFLOPS of known accelerators, by a substring of the device name.
pub const PEAK_TFLOPS: &[(&str, f64)] = &[
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
];

/// Model FLOPs per token of a training step (torchtitan's estimate): `6·N` for the matmuls over
/// the non-embedding parameters, plus `12·L·H·head_dim·T` for attention scores and values.
pub fn flops_per_token(
    non_embedding_params: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
) -> f64 {
    6.0 * non_embedding_params as f64 + 12.0 * (layers * heads * head_dim * seq_len) as f64
}

/// Appends one JSON object per line to `metrics.jsonl`.
pub struct MetricsLog {
    file: File,
}

impl MetricsLog {
    /// Opens (appending) `dir/metrics.jsonl`.
    pub fn open(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(MetricsLog { file })
    }

    /// Writes one line and flushes it.
    pub fn write(&mut self, line: &Map<String, Value>) -> Result<(), TrainError> {
        let mut text = serde_json::to_string(line).expect("json");
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainError::io("metrics.jsonl", e))
    }
}

/// Progress bar with ETA on a terminal; plain lines every `every` steps otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    every: u64,
    quiet: bool,
}

impl Progress {
    /// A display for steps `start..total`.
    pub fn new(start: u64, total: u64, every: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total).with_position(start);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Progress {
            bar,
            every: every.max(1),
            quiet,
        }
    }

    /// Reports step `step` (1-based count of completed steps).
    pub fn step(&self, step: u64, total: u64, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(message.to_string());
            }
            None if !self.quiet && (step.is_multiple_of(self.every) || step == total) => {
                eprintln!("step {step}/{total} {message}");
            }
            None => {}
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Keeps the metric lines of steps up to `step` when resuming (dropping those a killed run wrote
/// after its last checkpoint); a fresh run (`step == 0`) starts an empty file.
pub fn truncate_metrics(dir: &Path, step: u64) -> Result<(), TrainError> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| step > 0 && s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, kept).map_err(|e| TrainError::io(&path, e))
}
