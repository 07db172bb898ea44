//! One PNG line chart: a line with a dot per point for each series, and an optional dashed
//! reference line. Shared by the main job and the fidelity example.

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera licence, see `DejaVuSans-LICENSE.txt`), bundled so that the
/// plots need no system font.
static FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Okabe-Ito's colour-blind-safe palette (series beyond the eighth reuse it).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

/// What to draw.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Named series of `(x, y)` points; a series with an empty name has no legend entry.
    pub series: &'a [(String, Vec<(f64, f64)>)],
    /// Palette index of each series (by default the series' own index), so that related
    /// series can share a colour.
    pub colours: Option<&'a [usize]>,
    /// A labelled horizontal dashed line.
    pub reference: Option<(&'a str, f64)>,
}

/// Draws `chart` into a 960 x 600 PNG at `path`.
pub fn line_chart(path: &Path, chart: &Chart<'_>) -> Result<(), Box<dyn Error>> {
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| "the bundled font does not parse")?;
    let points = chart.series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x_max, mut y_min, mut y_max) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in points.chain(chart.reference.map(|(_, y)| (0.0, y))) {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !(y_min.is_finite() && y_max.is_finite()) {
        return Err("no finite value to plot".into());
    }
    let pad = ((y_max - y_min) * 0.08).max(1e-3);
    let x_end = x_max.max(1e-9) * 1.03;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut plot = ChartBuilder::on(&root)
        .caption(chart.title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_end, (y_min - pad)..(y_max + pad))?;
    plot.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .draw()?;
    if let Some((label, y)) = chart.reference {
        let style = BLACK.mix(0.5).stroke_width(1);
        plot.draw_series(DashedLineSeries::new([(0.0, y), (x_end, y)], 8, 6, style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
    }
    for (i, (name, points)) in chart.series.iter().enumerate() {
        let colour = chart.colours.and_then(|c| c.get(i)).copied().unwrap_or(i);
        let color = PALETTE[colour % PALETTE.len()];
        let style = color.stroke_width(3);
        let drawn = plot.draw_series(LineSeries::new(points.iter().copied(), style))?;
        if !name.is_empty() {
            drawn
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
        }
        plot.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
