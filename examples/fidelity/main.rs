//! Submodel fidelity: the held-out loss of DevFT's fused submodels before any training, per
//! capacity, grouper and fuser, on the main job's model and held-out set.
//!
//! ```text
//! cargo run --release --example fidelity [-- --help]
//! ```
//!
//! A stage whose submodel starts far above the full model's loss spends its rounds repairing
//! the fusion; this measures where that starts. It writes, under `--out` (default
//! `devft-results/fidelity/`): `fidelity.json` (every point, with its groups), `fidelity.md`
//! (a table per grouper, and the layers the spectral grouper keeps alone) and `fidelity.png`
//! (loss against capacity).

#[path = "../devft_vs_fedit/chart.rs"]
mod chart;
#[allow(dead_code)] // shared with the main job, which also uses the held-out texts
#[path = "../devft_vs_fedit/data.rs"]
mod data;

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use devft::data::TokenizedExample;
use devft::fidelity::{FidelityCase, FidelityReport, fidelity_sweep};
use devft::fusion::{DifferentialFuser, LayerFuser, MeanFuser};
use devft::grouping::{EvenGrouper, LayerGrouper, RandomGrouper, SpectralGrouper};

use chart::{Chart, line_chart};
use data::{AssetArgs, Assets, ExampleSplit, examples};

/// Held-out loss of fused submodels before training.
#[derive(Parser, Debug)]
struct Args {
    /// Directory for fidelity.json, fidelity.md and fidelity.png.
    #[arg(long, default_value = "devft-results/fidelity")]
    out: PathBuf,
    #[command(flatten)]
    assets: AssetArgs,
    /// Capacities (fused layers) to measure; values above the model's layers are skipped.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2,4,6,8,10,12,15,16,20,24,30"
    )]
    capacities: Vec<usize>,
    /// Betas of the differential fuser (the mean fuser is always measured too).
    #[arg(long, value_delimiter = ',', default_value = "0,0.05,0.1,0.2,0.3")]
    betas: Vec<f64>,
    /// Groupers: spectral, even, random.
    #[arg(long, value_delimiter = ',', default_value = "spectral,even,random")]
    groupers: Vec<String>,
    /// Held-out examples (the main job's, with the same seed and lengths).
    #[arg(long, default_value_t = 32)]
    eval_examples: usize,
    /// Tokens per example.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Earlier conversation turns in each prompt.
    #[arg(long, default_value_t = 1)]
    history: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Seed of the held-out draw and of the randomised groupers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    let Assets {
        model,
        tokenizer,
        data_path,
        ..
    } = args.assets.load()?;
    let split = ExampleSplit {
        seed: args.seed,
        history: args.history,
        seq_len: args.seq_len,
        eval_examples: args.eval_examples,
        train_examples: 0,
    };
    let (held_out, _) = examples(&data_path, &tokenizer, &split)?;
    let eval: Vec<TokenizedExample> = held_out.into_iter().map(|h| h.tokens).collect();

    let groupers = groupers(&args.groupers, args.seed)?;
    let fusers = fusers(&args.betas)?;
    let capacities: Vec<usize> = args
        .capacities
        .iter()
        .copied()
        .filter(|&k| k >= 1 && k <= model.num_layers())
        .collect();
    let mut case = FidelityCase::new(&capacities, args.batch_size, 0);
    for (name, grouper) in &groupers {
        case = case.with_grouper(name, grouper.as_ref());
    }
    for (name, fuser) in &fusers {
        case = case.with_fuser(name, fuser.as_ref());
    }
    eprintln!(
        "{} submodels of a {}-layer model on {} held-out examples",
        capacities.len() * groupers.len() * fusers.len(),
        model.num_layers(),
        eval.len()
    );
    let report = fidelity_sweep(&model, &eval, &case, |p| {
        eprintln!(
            "[{:5.0} s] {:>8} K={:<2} {:<20} loss {:.4}",
            started.elapsed().as_secs_f64(),
            p.grouper,
            p.capacity,
            p.fuser,
            p.loss
        );
    })?;

    std::fs::write(
        args.out.join("fidelity.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let table = markdown(&report, &groupers, &fusers);
    println!("{table}");
    std::fs::write(args.out.join("fidelity.md"), table)?;
    plot(&args.out.join("fidelity.png"), &report, &fusers)?;
    eprintln!(
        "done in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

type Named<T> = Vec<(String, Box<T>)>;

fn groupers(names: &[String], seed: u64) -> Result<Named<dyn LayerGrouper>, Box<dyn Error>> {
    names
        .iter()
        .map(
            |name| -> Result<(String, Box<dyn LayerGrouper>), Box<dyn Error>> {
                let grouper: Box<dyn LayerGrouper> = match name.as_str() {
                    "spectral" => Box::new(SpectralGrouper::new().with_seed(seed)),
                    "even" => Box::new(EvenGrouper),
                    "random" => Box::new(RandomGrouper::new(seed)),
                    other => return Err(format!("unknown grouper `{other}`").into()),
                };
                Ok((name.clone(), grouper))
            },
        )
        .collect()
}

fn fusers(betas: &[f64]) -> Result<Named<dyn LayerFuser>, Box<dyn Error>> {
    let mut out: Named<dyn LayerFuser> = Vec::new();
    for &beta in betas {
        out.push((
            format!("beta={beta}"),
            Box::new(DifferentialFuser::new(beta)?),
        ));
    }
    out.push(("mean".to_string(), Box::new(MeanFuser)));
    Ok(out)
}

/// A table per grouper (rows: capacity; columns: fuser) and the spectral singletons.
fn markdown(
    report: &FidelityReport,
    groupers: &Named<dyn LayerGrouper>,
    fusers: &Named<dyn LayerFuser>,
) -> String {
    let mut out = format!(
        "Held-out loss of each fused submodel before training; full model ({} layers): {:.4}.\n",
        report.num_layers, report.full_loss
    );
    for (grouper, _) in groupers {
        let _ = write!(out, "\n#### {grouper} grouping\n\n| K |");
        for (fuser, _) in fusers {
            let _ = write!(out, " {fuser} |");
        }
        out += "\n|---:|";
        out += &"---:|".repeat(fusers.len());
        out += "\n";
        let mut capacities: Vec<usize> = report.points.iter().map(|p| p.capacity).collect();
        capacities.sort_unstable();
        capacities.dedup();
        for k in capacities {
            let _ = write!(out, "| {k} |");
            for (fuser, _) in fusers {
                let loss = report
                    .points
                    .iter()
                    .find(|p| &p.grouper == grouper && &p.fuser == fuser && p.capacity == k)
                    .map_or(f64::NAN, |p| p.loss);
                let _ = write!(out, " {loss:.3} |");
            }
            out += "\n";
        }
    }
    let spectral: Vec<_> = report
        .points
        .iter()
        .filter(|p| p.grouper == "spectral" && Some(&p.fuser) == fusers.first().map(|f| &f.0))
        .collect();
    if !spectral.is_empty() {
        out += "\n#### Layers the spectral grouper keeps alone, and its largest group\n\n";
        out += "| K | single layers | largest group |\n|---:|---|---|\n";
        for p in spectral {
            let singles: Vec<usize> = p
                .groups
                .iter()
                .filter(|g| g.len() == 1)
                .map(|g| g[0])
                .collect();
            let largest = p.groups.iter().max_by_key(|g| g.len()).cloned();
            let _ = writeln!(
                out,
                "| {} | {singles:?} | {:?} |",
                p.capacity,
                largest.unwrap_or_default()
            );
        }
    }
    out
}

/// Loss against capacity: the spectral grouper with every fuser, the other groupers with the
/// default fuser (beta = 0.1, else the first).
fn plot(
    path: &Path,
    report: &FidelityReport,
    fusers: &Named<dyn LayerFuser>,
) -> Result<(), Box<dyn Error>> {
    let default_fuser = fusers
        .iter()
        .map(|f| f.0.as_str())
        .find(|f| *f == "beta=0.1")
        .unwrap_or(&fusers[0].0);
    let mut keys: Vec<(String, String)> = Vec::new();
    for p in &report.points {
        let key = (p.grouper.clone(), p.fuser.clone());
        if (p.grouper == "spectral" || p.fuser == default_fuser) && !keys.contains(&key) {
            keys.push(key);
        }
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = keys
        .iter()
        .map(|(grouper, fuser)| {
            let points = report
                .points
                .iter()
                .filter(|p| &p.grouper == grouper && &p.fuser == fuser)
                .map(|p| (p.capacity as f64, p.loss))
                .collect();
            (format!("{grouper}, {fuser}"), points)
        })
        .collect();
    line_chart(
        path,
        &Chart {
            title: "Fused submodels before training",
            x_label: "layers of the submodel (K)",
            y_label: "held-out loss",
            series: &series,
            reference: Some(("full model", report.full_loss)),
            colours: None,
        },
    )
}
