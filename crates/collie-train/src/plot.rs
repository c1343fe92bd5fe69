//! `loss.png`: training loss (and eval loss) against step, with the learning rate beneath.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

/// Series to draw.
pub struct Curves<'a> {
    /// `(step, loss)` of training steps.
    pub loss: &'a [(f64, f64)],
    /// `(step, eval_loss)`.
    pub eval_loss: &'a [(f64, f64)],
    /// `(step, lr)`.
    pub lr: &'a [(f64, f64)],
}

/// Registers DejaVu Sans (or Liberation Sans) from the system's font directory, once; returns
/// whether text can be drawn.
fn fonts() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ];
        candidates.iter().any(|p| match std::fs::read(p) {
            Ok(bytes) => {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            }
            Err(_) => false,
        })
    })
}

fn range(points: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// Draws the curves into a PNG; without a system font the axes carry no labels.
pub fn draw(path: &Path, curves: &Curves) -> Result<(), String> {
    let labels = fonts();
    let root = BitMapBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(440);
    let max_step = curves
        .loss
        .iter()
        .chain(curves.lr)
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let (lo, hi) = range(curves.loss.iter().chain(curves.eval_loss).map(|p| p.1));
    let mut chart = ChartBuilder::on(&top);
    chart.margin(12);
    if labels {
        chart
            .caption("loss", ("sans-serif", 20))
            .x_label_area_size(30)
            .y_label_area_size(70);
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(|e| e.to_string())?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    let train = chart
        .draw_series(LineSeries::new(curves.loss.iter().copied(), &BLUE))
        .map_err(|e| e.to_string())?;
    if labels {
        train
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !curves.eval_loss.is_empty() {
        chart
            .draw_series(PointSeries::of_element(
                curves.eval_loss.iter().copied(),
                5,
                &RED,
                &|c, s, st| Circle::new(c, s, st.filled()),
            ))
            .map_err(|e| e.to_string())?;
        let eval = chart
            .draw_series(LineSeries::new(curves.eval_loss.iter().copied(), &RED))
            .map_err(|e| e.to_string())?;
        if labels {
            eval.label("eval loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    let (lo, hi) = range(curves.lr.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&bottom);
    chart.margin(12);
    if labels {
        chart
            .caption("learning rate", ("sans-serif", 16))
            .x_label_area_size(30)
            .y_label_area_size(70);
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(|e| e.to_string())?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_labels(4)
            .y_label_formatter(&|y| format!("{y:.1e}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    chart
        .draw_series(LineSeries::new(curves.lr.iter().copied(), &GREEN))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// One line of the memory plot: a label and `(parameters in millions, bytes per parameter)`.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points, by model size.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed-style (a reference line, not a measurement) when true.
    pub reference: bool,
}

/// Draws peak memory per parameter against model size (`collie bench memory --sweep`).
pub fn draw_memory(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    let labels = fonts();
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let x_hi = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.05;
    let y_hi = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root);
    chart.margin(16);
    if labels {
        chart
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(36)
            .y_label_area_size(56);
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..x_hi, 0.0..y_hi)
        .map_err(|e| e.to_string())?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("parameters (millions)")
            .y_desc("peak memory / parameter (bytes)")
            .draw()
            .map_err(|e| e.to_string())?;
    }
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = if s.reference {
            color.stroke_width(1)
        } else {
            color.stroke_width(2)
        };
        let line = chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))
            .map_err(|e| e.to_string())?;
        if labels {
            line.label(s.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        if !s.reference {
            chart
                .draw_series(PointSeries::of_element(
                    s.points.iter().copied(),
                    4,
                    color.filled(),
                    &|c, sz, st| Circle::new(c, sz, st),
                ))
                .map_err(|e| e.to_string())?;
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Draws `loss.png` from `metrics.jsonl`.
pub fn plot_metrics(dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).map_err(|e| e.to_string())?;
    let (mut loss, mut eval, mut lr) = (Vec::new(), Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let step = v.get("step").and_then(Value::as_f64).unwrap_or(0.0);
        if let Some(l) = v.get("loss").and_then(Value::as_f64) {
            loss.push((step, l));
        }
        if let Some(l) = v.get("lr").and_then(Value::as_f64) {
            lr.push((step, l));
        }
        if let Some(l) = v.get("eval_loss").and_then(Value::as_f64) {
            eval.push((step, l));
        }
    }
    draw(
        &dir.join("loss.png"),
        &Curves {
            loss: &loss,
            eval_loss: &eval,
            lr: &lr,
        },
    )
}
