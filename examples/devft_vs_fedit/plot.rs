//! PNG plots of held-out loss, both methods on one chart.

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;

use crate::report::{MethodResult, Progress};

/// DejaVu Sans (Bitstream Vera licence, see `DejaVuSans-LICENSE.txt`), bundled so that the
/// plots need no system font.
static FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Writes `loss_vs_time.png` and `loss_vs_uplink.png` under `dir`.
pub fn loss_plots(
    dir: &Path,
    devft: &MethodResult,
    fedit: &MethodResult,
) -> Result<(), Box<dyn Error>> {
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| "the bundled font does not parse")?;
    let target = fedit.progress().last().map(|p| p.eval_loss);
    let curves = |x: fn(&Progress) -> f64| -> Vec<(&str, Vec<(f64, f64)>)> {
        [devft, fedit]
            .iter()
            .map(|m| {
                let points = m.progress().iter().map(|p| (x(p), p.eval_loss)).collect();
                (m.name, points)
            })
            .collect()
    };
    line_chart(
        &dir.join("loss_vs_time.png"),
        "Held-out loss against training time",
        "seconds of federated work (evaluation excluded)",
        &curves(|p| p.seconds),
        target,
    )?;
    line_chart(
        &dir.join("loss_vs_uplink.png"),
        "Held-out loss against communication",
        "cumulative uplink (MB)",
        &curves(|p| p.uplink as f64 / 1e6),
        target,
    )
}

/// One line per series with a dot per round, and a dashed line at `target` (FedIT's final
/// loss).
fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    target: Option<f64>,
) -> Result<(), Box<dyn Error>> {
    let points = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x_max, mut y_min, mut y_max) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !(y_min.is_finite() && y_max.is_finite()) {
        return Err("no finite loss to plot".into());
    }
    let pad = ((y_max - y_min) * 0.08).max(1e-3);
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max.max(1e-9) * 1.03, (y_min - pad)..(y_max + pad))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("held-out loss")
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .draw()?;
    if let Some(target) = target {
        let style = BLACK.mix(0.5).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, target), (x_max * 1.03, target)],
                8,
                6,
                style,
            ))?
            .label("FedIT's final loss")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
    }
    let colors = [RGBColor(0, 114, 178), RGBColor(213, 94, 0)];
    for ((name, points), color) in series.iter().zip(colors) {
        let style = color.stroke_width(3);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
