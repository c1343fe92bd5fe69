//! Monitors: `metrics.jsonl`, per-rank logs, the run summary, throughput, MFU, memory, and the
//! progress display.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use collie_dist::Dist;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

use crate::error::TrainError;
use crate::trainer::{StepMetrics, Summary};

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

/// Writes `line` to the metrics log where this rank keeps one.
pub(crate) fn write_line(
    log: &mut Option<MetricsLog>,
    line: &Map<String, Value>,
) -> Result<(), TrainError> {
    log.as_mut().map_or(Ok(()), |l| l.write(line))
}

/// `output.dir/logs/rank-K.log` of a parallel run: one line per step from every rank, so a rank
/// that fails or slows down can be told apart.
pub(crate) struct RankLog(Option<(std::fs::File, PathBuf)>);

impl RankLog {
    pub(crate) fn open(dir: &Path, dist: &Dist) -> Result<Self, TrainError> {
        if dist.size() == 1 {
            return Ok(RankLog(None));
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| TrainError::io(&logs, e))?;
        let path = logs.join(format!("rank-{}.log", dist.rank));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        let c = dist.coords;
        writeln!(
            file,
            "rank {} of {} ({}): dp_rank {} tp_rank {} pp_rank {} pid {}",
            dist.rank,
            dist.size(),
            dist.dims,
            c.dp,
            c.tp,
            c.pp,
            std::process::id()
        )
        .map_err(|e| TrainError::io(&path, e))?;
        Ok(RankLog(Some((file, path))))
    }

    pub(crate) fn line(&mut self, text: &str) -> Result<(), TrainError> {
        if let Some((file, path)) = &mut self.0 {
            writeln!(file, "{text}").map_err(|e| TrainError::io(&*path, e))?;
        }
        Ok(())
    }

    pub(crate) fn step(
        &mut self,
        step: u64,
        m: &StepMetrics,
        wait: Option<f64>,
    ) -> Result<(), TrainError> {
        if let Some((file, path)) = &mut self.0 {
            let wait = wait.map_or(String::new(), |w| format!(" pipeline_wait {w:.3}"));
            writeln!(
                file,
                "step {step} loss {:.6} grad_norm {:.6} seconds {:.3} comm_exposed {:.3}{wait}",
                m.loss, m.grad_norm, m.seconds, m.comm_seconds
            )
            .map_err(|e| TrainError::io(&*path, e))?;
        }
        Ok(())
    }
}

pub(crate) fn fmt_metrics(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn eval_line(step: u64, m: &BTreeMap<String, f64>) -> Map<String, Value> {
    let mut line = Map::new();
    line.insert("step".into(), json!(step));
    for (k, v) in m {
        line.insert(k.clone(), json!(v));
    }
    line
}

pub(crate) fn summary_text(s: &Summary) -> String {
    let mut out = format!(
        "done: {} steps, final loss {:.4}, {} tokens in {:.1} s ({:.0} tokens/s)",
        s.steps, s.final_loss, s.tokens, s.train_seconds, s.tokens_per_sec
    );
    if let (Some(a), Some(b)) = (&s.eval_first, &s.eval_last) {
        if let (Some(x), Some(y)) = (a.get("eval_loss"), b.get("eval_loss")) {
            out.push_str(&format!(", eval_loss {x:.4} -> {y:.4}"));
        }
    }
    if let Some(rss) = s.peak_rss_bytes {
        out.push_str(&format!(
            ", peak RSS {:.0} MiB",
            rss as f64 / (1024.0 * 1024.0)
        ));
    }
    out.push_str(&format!("\ncheckpoint: {}", s.checkpoint.display()));
    out
}

pub(crate) fn write_summary(dir: &Path, s: &Summary) -> Result<(), TrainError> {
    let v = json!({
        "steps": s.steps,
        "final_loss": s.final_loss,
        "eval_first": s.eval_first,
        "eval_last": s.eval_last,
        "tokens": s.tokens,
        "train_seconds": s.train_seconds,
        "tokens_per_sec": s.tokens_per_sec,
        "peak_rss_bytes": s.peak_rss_bytes,
        "peak_rss_bytes_per_rank": s.peak_rss_bytes_per_rank,
        "train_peak_rss_bytes_per_rank": s.train_peak_rss_bytes_per_rank,
        "checkpoint": s.checkpoint,
        "stopped_early": s.stopped_early,
        "trainable_params": s.trainable_params,
    });
    collie_io::json::write_json(&dir.join("summary.json"), &v).map_err(TrainError::from)
}
