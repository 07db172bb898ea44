//! PNG plots of held-out loss, both methods on one chart.

use std::error::Error;
use std::path::Path;

use crate::chart::{Chart, line_chart};
use crate::report::Progress;

/// One seed's held-out loss curves: the seed, DevFT's and FedIT's progress.
pub struct SeedCurves {
    pub seed: u64,
    pub devft: Vec<Progress>,
    pub fedit: Vec<Progress>,
}

/// Writes `loss_vs_time.png` and `loss_vs_uplink.png` under `dir`: both methods' held-out
/// loss for every seed in `runs` (one colour per method), with FedIT's final loss as the
/// reference line when there is a single seed.
pub fn loss_plots(dir: &Path, runs: &[SeedCurves]) -> Result<(), Box<dyn Error>> {
    let target = match runs {
        [only] => only
            .fedit
            .last()
            .map(|p| ("FedIT's final loss", p.eval_loss)),
        _ => None,
    };
    let mut colours = Vec::new();
    let curves = |x: fn(&Progress) -> f64, colours: &mut Vec<usize>| {
        let mut series = Vec::new();
        for (colour, (method, pick)) in [
            (
                "DevFT",
                (|r: &SeedCurves| &r.devft) as fn(&SeedCurves) -> &Vec<Progress>,
            ),
            ("FedIT", |r: &SeedCurves| &r.fedit),
        ]
        .into_iter()
        .enumerate()
        {
            for (i, run) in runs.iter().enumerate() {
                let name = match (runs.len(), i) {
                    (1, _) => method.to_string(),
                    (_, 0) => format!(
                        "{method} (seeds {})",
                        runs.iter()
                            .map(|r| r.seed.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ => String::new(),
                };
                series.push((
                    name,
                    pick(run).iter().map(|p| (x(p), p.eval_loss)).collect(),
                ));
                colours.push(colour);
            }
        }
        series
    };
    let by_time = curves(|p| p.seconds, &mut colours);
    let by_uplink = curves(|p| p.uplink as f64 / 1e6, &mut Vec::new());
    line_chart(
        &dir.join("loss_vs_time.png"),
        &Chart {
            title: "Held-out loss against training time",
            x_label: "seconds of federated work (evaluation excluded)",
            y_label: "held-out loss",
            series: &by_time,
            reference: target,
            colours: Some(&colours),
        },
    )?;
    line_chart(
        &dir.join("loss_vs_uplink.png"),
        &Chart {
            title: "Held-out loss against communication",
            x_label: "cumulative uplink (MB)",
            y_label: "held-out loss",
            series: &by_uplink,
            reference: target,
            colours: Some(&colours),
        },
    )
}
