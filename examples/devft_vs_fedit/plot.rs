//! PNG plots of held-out loss, both methods on one chart.

use std::error::Error;
use std::path::Path;

use crate::chart::{Chart, line_chart};
use crate::report::{MethodResult, Progress};

/// Writes `loss_vs_time.png` and `loss_vs_uplink.png` under `dir`.
pub fn loss_plots(
    dir: &Path,
    devft: &MethodResult,
    fedit: &MethodResult,
) -> Result<(), Box<dyn Error>> {
    let target = fedit
        .progress()
        .last()
        .map(|p| ("FedIT's final loss", p.eval_loss));
    let curves = |x: fn(&Progress) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        [devft, fedit]
            .iter()
            .map(|m| {
                let points = m.progress().iter().map(|p| (x(p), p.eval_loss)).collect();
                (m.name.to_string(), points)
            })
            .collect()
    };
    line_chart(
        &dir.join("loss_vs_time.png"),
        &Chart {
            title: "Held-out loss against training time",
            x_label: "seconds of federated work (evaluation excluded)",
            y_label: "held-out loss",
            series: &curves(|p| p.seconds),
            reference: target,
        },
    )?;
    line_chart(
        &dir.join("loss_vs_uplink.png"),
        &Chart {
            title: "Held-out loss against communication",
            x_label: "cumulative uplink (MB)",
            y_label: "held-out loss",
            series: &curves(|p| p.uplink as f64 / 1e6),
            reference: target,
        },
    )
}
