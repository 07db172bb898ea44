//! The side-by-side tables of the main job.

use devft::federated::RoundMetrics;
use devft::model::CausalLm;

/// One method's finished run.
#[derive(Debug)]
pub struct MethodResult {
    /// "DevFT" or "FedIT".
    pub name: &'static str,
    /// Held-out loss before the first round.
    pub initial_loss: f64,
    /// Every round's metrics.
    pub metrics: Vec<RoundMetrics>,
    /// The full model with everything learned.
    pub model: CausalLm,
    /// Wall-clock seconds of the whole run, evaluation included.
    pub wall_seconds: f64,
}

/// The state after a round, accumulated from the start (round 0: before training).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub round: usize,
    /// Seconds of federated work (training, coding, aggregation, stage set-up), without the
    /// held-out evaluation, which is the same for both methods.
    pub seconds: f64,
    /// Client-to-server bytes (whole messages).
    pub uplink: u64,
    /// Server-to-client bytes (whole messages: tasks, stage set-ups, probes).
    pub downlink: u64,
    pub eval_loss: f64,
}

impl MethodResult {
    /// Round 0 and every evaluated round, accumulated.
    pub fn progress(&self) -> Vec<Progress> {
        let mut out = vec![Progress {
            round: 0,
            seconds: 0.0,
            uplink: 0,
            downlink: 0,
            eval_loss: self.initial_loss,
        }];
        let mut now = out[0];
        for m in &self.metrics {
            now.round = m.round;
            now.seconds += m.wall_seconds - m.eval_seconds;
            now.uplink += m.bytes_up.total + m.bytes_probe_up.total;
            now.downlink += m.bytes_down.total + m.bytes_setup.total + m.bytes_probe_down.total;
            if let Some(loss) = m.eval_loss {
                now.eval_loss = loss;
                out.push(now);
            }
        }
        out
    }

    /// The first point at or below `target` loss (none when the loss never gets there, or is
    /// not a number).
    fn reaching(&self, target: f64) -> Option<Progress> {
        self.progress().into_iter().find(|p| p.eval_loss <= target)
    }

    /// The held-out loss of the last round finished within `seconds` of federated work.
    fn loss_within(&self, seconds: f64) -> f64 {
        self.progress()
            .into_iter()
            .take_while(|p| p.seconds <= seconds)
            .last()
            .map_or(self.initial_loss, |p| p.eval_loss)
    }

    /// The held-out loss of the last evaluated round within `bytes` of uplink.
    fn loss_within_uplink(&self, bytes: u64) -> f64 {
        self.progress()
            .into_iter()
            .take_while(|p| p.uplink <= bytes)
            .last()
            .map_or(self.initial_loss, |p| p.eval_loss)
    }

    /// Distinct clients whose training reached the server (sampled and not failed).
    fn clients_trained(&self) -> usize {
        let mut trained: Vec<usize> = self
            .metrics
            .iter()
            .flat_map(|m| {
                m.clients_sampled
                    .iter()
                    .copied()
                    .filter(|c| m.clients_failed.iter().all(|(f, _)| f != c))
            })
            .collect();
        trained.sort_unstable();
        trained.dedup();
        trained.len()
    }

    fn last(&self) -> Progress {
        *self.progress().last().expect("round 0 is always there")
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn ratio(fedit: f64, devft: f64) -> String {
    if devft > 0.0 {
        format!("{:.2}x", fedit / devft)
    } else {
        "-".into()
    }
}

/// Time, uplink and downlink of DevFT at `d` and FedIT at `f`, with the FedIT / DevFT ratios,
/// as table rows labelled with `what` appended.
fn cost_rows(what: &str, d: &Progress, f: &Progress) -> String {
    let seconds = |p: &Progress| format!("{:.0} s", p.seconds);
    [
        ("time", seconds(d), seconds(f), ratio(f.seconds, d.seconds)),
        (
            "uplink",
            mb(d.uplink),
            mb(f.uplink),
            ratio(f.uplink as f64, d.uplink as f64),
        ),
        (
            "downlink",
            mb(d.downlink),
            mb(f.downlink),
            ratio(f.downlink as f64, d.downlink as f64),
        ),
    ]
    .into_iter()
    .map(|(name, d, f, r)| format!("| {name}{what} | {d} | {f} | {r} |\n"))
    .collect()
}

/// The Markdown report: overall table, per-stage table and the settings.
pub fn summary(
    devft: &MethodResult,
    fedit: &MethodResult,
    settings: &str,
    num_layers: usize,
) -> String {
    let (d, f) = (devft.last(), fedit.last());
    let target = f.eval_loss;
    let mut out = String::from("## DevFT vs FedIT\n\n");
    out += &format!(
        "Held-out loss before training: {:.4}. Time counts the federated work (local \
         training, coding, aggregation, DevFT's grouping and fusion), not the per-round \
         held-out evaluation that both methods share; bytes are whole safetensors messages. \
         This is one seed: differences between the methods can change sign from seed to seed \
         (docs/results.md); `--seeds N` gives their mean and spread.\n\n",
        devft.initial_loss
    );
    out += "| | DevFT | FedIT | FedIT / DevFT |\n|---|---|---|---|\n";
    out += &format!("| rounds | {} | {} | |\n", d.round, f.round);
    out += &format!(
        "| clients that trained | {} | {} | |\n",
        devft.clients_trained(),
        fedit.clients_trained()
    );
    out += &format!(
        "| final held-out loss | {:.4} | {:.4} | |\n",
        d.eval_loss, f.eval_loss
    );
    out += &cost_rows(", total", &d, &f);
    out += &format!(
        "| wall time with evaluation | {:.0} s | {:.0} s | |\n",
        devft.wall_seconds, fedit.wall_seconds
    );
    let round = |p: Option<Progress>| p.map_or("not reached".to_string(), |p| p.round.to_string());
    let (reach_d, reach_f) = (devft.reaching(target), fedit.reaching(target));
    out += &format!(
        "| rounds to FedIT's final loss ({target:.4}) | {} | {} | |\n",
        round(reach_d),
        round(reach_f)
    );
    if let (Some(reach_d), Some(reach_f)) = (reach_d, reach_f) {
        out += &cost_rows(" to FedIT's final loss", &reach_d, &reach_f);
    }
    out += &format!(
        "| held-out loss after DevFT's total time ({:.0} s) | {:.4} | {:.4} | |\n",
        d.seconds,
        d.eval_loss,
        fedit.loss_within(d.seconds)
    );
    if let (Some(own), Some(other)) = (devft.reaching(d.eval_loss), fedit.reaching(d.eval_loss)) {
        out += &cost_rows(
            &format!(" to DevFT's final loss ({:.4})", d.eval_loss),
            &own,
            &other,
        );
    }
    out += "\n### Per stage\n\n";
    out += "| method | stage | layers | rounds | time / round | evaluation / round | \
            uplink / round | downlink / round | of which stage set-up | client memory (est.) | \
            peak RSS of client training (measured, whole process) | clients left out | \
            held-out loss at end |\n";
    out += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for method in [devft, fedit] {
        for row in stage_rows(&method.metrics) {
            let left_out = if row.left_out.is_empty() {
                "none".to_string()
            } else {
                format!("{:?} (memory)", row.left_out)
            };
            out += &format!(
                "| {} | {} | {}/{num_layers} | {} | {:.1} s | {:.1} s | {} | {} | {} | {:.0} MB | {} | {left_out} | {:.4} |\n",
                method.name,
                row.stage + 1,
                row.capacity,
                row.rounds,
                row.seconds / row.rounds as f64,
                row.eval_seconds / row.rounds as f64,
                mb(row.uplink / row.rounds as u64),
                mb(row.downlink / row.rounds as u64),
                mb(row.setup / row.rounds as u64),
                row.memory_bytes as f64 / 1e6,
                row.peak_rss_bytes
                    .map_or("-".to_string(), |b| format!("{:.0} MB", b as f64 / 1e6)),
                row.final_loss
            );
        }
    }
    out += &format!("\nSettings: `{settings}`\n");
    out
}

/// Totals of one stage.
struct StageRow {
    stage: usize,
    capacity: usize,
    rounds: usize,
    seconds: f64,
    eval_seconds: f64,
    uplink: u64,
    /// Tasks and stage set-ups.
    downlink: u64,
    /// Stage set-ups alone.
    setup: u64,
    memory_bytes: u64,
    peak_rss_bytes: Option<u64>,
    /// Clients left out of the stage for their memory budget.
    left_out: Vec<usize>,
    final_loss: f64,
}

fn stage_rows(metrics: &[RoundMetrics]) -> Vec<StageRow> {
    let mut rows: Vec<StageRow> = Vec::new();
    for m in metrics {
        if rows.last().is_none_or(|r| r.stage != m.stage) {
            rows.push(StageRow {
                stage: m.stage,
                capacity: m.capacity,
                rounds: 0,
                seconds: 0.0,
                eval_seconds: 0.0,
                uplink: 0,
                downlink: 0,
                setup: 0,
                memory_bytes: 0,
                peak_rss_bytes: None,
                left_out: Vec::new(),
                final_loss: f64::NAN,
            });
        }
        let row = rows.last_mut().expect("pushed above");
        row.rounds += 1;
        row.seconds += m.wall_seconds - m.eval_seconds;
        row.eval_seconds += m.eval_seconds;
        row.uplink += m.bytes_up.total;
        row.downlink += m.bytes_down.total + m.bytes_setup.total;
        row.setup += m.bytes_setup.total;
        row.memory_bytes = row.memory_bytes.max(m.memory_bytes);
        row.peak_rss_bytes = row.peak_rss_bytes.max(m.peak_rss_bytes);
        for (client, _) in &m.clients_excluded {
            if !row.left_out.contains(client) {
                row.left_out.push(*client);
            }
        }
        row.final_loss = m.eval_loss.unwrap_or(f64::NAN);
    }
    rows
}

/// One quantity of the comparison, for both methods (`None`: not defined for this seed, e.g.
/// a loss never reached).
pub struct KeyRow {
    pub label: &'static str,
    pub devft: Option<f64>,
    pub fedit: Option<f64>,
    /// Whether FedIT / DevFT is a saving (costs), not a quality.
    pub cost: bool,
}

/// The numbers the multi-seed table reports: quality at equal cost and cost to equal quality.
pub fn key_rows(devft: &MethodResult, fedit: &MethodResult) -> Vec<KeyRow> {
    let (d, f) = (devft.last(), fedit.last());
    let target = f.eval_loss;
    let (reach_d, reach_f) = (devft.reaching(target), fedit.reaching(target));
    let row = |label, devft: Option<f64>, fedit: Option<f64>, cost| KeyRow {
        label,
        devft,
        fedit,
        cost,
    };
    vec![
        row(
            "final held-out loss",
            Some(d.eval_loss),
            Some(f.eval_loss),
            false,
        ),
        row(
            "clients that trained",
            Some(devft.clients_trained() as f64),
            Some(fedit.clients_trained() as f64),
            false,
        ),
        row("federated time (s)", Some(d.seconds), Some(f.seconds), true),
        row(
            "uplink (MB)",
            Some(d.uplink as f64 / 1e6),
            Some(f.uplink as f64 / 1e6),
            true,
        ),
        row(
            "downlink (MB)",
            Some(d.downlink as f64 / 1e6),
            Some(f.downlink as f64 / 1e6),
            true,
        ),
        row(
            "held-out loss at DevFT's total time",
            Some(d.eval_loss),
            Some(fedit.loss_within(d.seconds)),
            false,
        ),
        row(
            "held-out loss at DevFT's total uplink",
            Some(d.eval_loss),
            Some(fedit.loss_within_uplink(d.uplink)),
            false,
        ),
        row(
            "time to FedIT's final loss (s)",
            reach_d.map(|p| p.seconds),
            reach_f.map(|p| p.seconds),
            true,
        ),
        row(
            "uplink to FedIT's final loss (MB)",
            reach_d.map(|p| p.uplink as f64 / 1e6),
            reach_f.map(|p| p.uplink as f64 / 1e6),
            true,
        ),
    ]
}

/// `mean ± sample standard deviation (n)` of the defined values.
fn spread(values: impl Iterator<Item = Option<f64>>, total: usize) -> String {
    let values: Vec<f64> = values.flatten().collect();
    if values.is_empty() {
        return format!("never (0 of {total})");
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = if values.len() > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    // Counts (clients that trained) with one decimal, as large quantities.
    let digits = if mean.abs() < 20.0 && values.iter().any(|v| v.fract() != 0.0) {
        4
    } else {
        1
    };
    let counted = if values.len() < total {
        format!(" ({} of {total})", values.len())
    } else {
        String::new()
    };
    format!("{mean:.digits$} ± {sd:.digits$}{counted}")
}

/// The table over seeds: each quantity's mean ± standard deviation for both methods, and of
/// the per-seed FedIT / DevFT ratio of costs.
pub fn multi_seed_summary(per_seed: &[Vec<KeyRow>], seeds: &[u64], settings: &str) -> String {
    let mut out = format!(
        "## DevFT vs FedIT over {} seeds ({})\n\nEach cell: mean ± sample standard \
         deviation over the seeds; a count where a quantity is not defined in every seed \
         (a loss never reached). Every seed changes the data split, the held-out set, the \
         LoRA initialisation, the client sampling and the batch order; within a seed both \
         methods share all of them. Per-seed tables: `seed-S/summary.md`.\n\n",
        seeds.len(),
        seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    out += "| quantity | DevFT | FedIT | FedIT / DevFT |\n|---|---|---|---|\n";
    let total = per_seed.len();
    for (i, first) in per_seed[0].iter().enumerate() {
        let column =
            |pick: fn(&KeyRow) -> Option<f64>| per_seed.iter().map(move |rows| pick(&rows[i]));
        let ratio = if first.cost {
            spread(
                per_seed
                    .iter()
                    .map(|rows| match (rows[i].devft, rows[i].fedit) {
                        (Some(d), Some(f)) if d > 0.0 => Some(f / d),
                        _ => None,
                    }),
                total,
            )
        } else {
            String::new()
        };
        out += &format!(
            "| {} | {} | {} | {ratio} |\n",
            first.label,
            spread(column(|r| r.devft), total),
            spread(column(|r| r.fedit), total)
        );
    }
    out += &format!("\nSettings: `{settings}`\n");
    out
}
