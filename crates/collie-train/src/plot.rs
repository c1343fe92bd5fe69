//! `loss.png`: training loss (and eval loss) against step, with the learning rate beneath.

use std::path::Path;

use plotters::prelude::*;

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
            .y_label_area_size(50);
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(|e| e.to_string())?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| e.to_string())?;
    }
    chart
        .draw_series(LineSeries::new(curves.loss.iter().copied(), &BLUE))
        .map_err(|e| e.to_string())?;
    if !curves.eval_loss.is_empty() {
        chart
            .draw_series(PointSeries::of_element(
                curves.eval_loss.iter().copied(),
                5,
                &RED,
                &|c, s, st| Circle::new(c, s, st.filled()),
            ))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(curves.eval_loss.iter().copied(), &RED))
            .map_err(|e| e.to_string())?;
    }
    let (lo, hi) = range(curves.lr.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&bottom);
    chart.margin(12);
    if labels {
        chart
            .caption("learning rate", ("sans-serif", 16))
            .x_label_area_size(30)
            .y_label_area_size(50);
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(|e| e.to_string())?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| e.to_string())?;
    }
    chart
        .draw_series(LineSeries::new(curves.lr.iter().copied(), &GREEN))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
