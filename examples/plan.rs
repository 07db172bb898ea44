//! Prints, as JSON, DevFT's view of a model: the layer-similarity matrix, the groups for K,
//! and the fused submodel's logits on given token ids.
//!
//! ```text
//! cargo run --release --example plan -- --model DIR [--adapter DIR] --groups K \
//!     [--grouper spectral|even|random] [--fuser differential|anchor|mean] [--beta 0.1] \
//!     [--seed 0] --ids 1,2,3
//! ```
//!
//! Output keys: `num_layers`, `cosine`, `similarity`, `laplacian`, `eigenvalues`, `groups`
//! (ordered by smallest layer), `grouper`, `fuser`, `ids`, `logits` (`[seq][vocab]` of the
//! fused submodel), `loss` (mean next-token loss, `null` for one id).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use devft::fusion::FuserKind;
use devft::grouping::{GrouperKind, SpectralGrouper, layer_similarity};
use devft::model::{CausalLm, import_adapter};
use devft::transfer::build_submodel;

/// DevFT grouping and fusion of a model, as JSON.
#[derive(Parser, Debug)]
struct Args {
    /// HuggingFace model directory, or a `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Number of groups K (1..=layers).
    #[arg(long)]
    groups: usize,
    /// Grouping algorithm: spectral, even or random.
    #[arg(long, default_value = "spectral")]
    grouper: GrouperKind,
    /// Fusion: differential, anchor or mean.
    #[arg(long, default_value = "differential")]
    fuser: String,
    /// Differential fusion weight.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Seed of the k-means restarts or of the random grouping.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Backend: flex, ndarray, tch, wgpu or cuda (those enabled as features).
    #[arg(long, default_value = "flex")]
    device: String,
}

fn fuser_kind(name: &str, beta: f64) -> devft::Result<FuserKind> {
    match name {
        "differential" => Ok(FuserKind::Differential { beta }),
        "anchor" => Ok(FuserKind::Anchor),
        "mean" => Ok(FuserKind::Mean),
        other => Err(devft::Error::InvalidArgument(format!(
            "unknown fuser `{other}` (differential, anchor, mean)"
        ))),
    }
}

fn run(args: Args) -> devft::Result<serde_json::Value> {
    let device = devft::device::device_from_name(&args.device)?;
    let mut model = CausalLm::load(&args.model, &device)?;
    if let Some(adapter) = &args.adapter {
        model = import_adapter(&model, adapter)?;
    }
    let fuser = fuser_kind(&args.fuser, args.beta)?;
    let similarity = layer_similarity(&model)?;
    let (spectral_grouping, spectral) = SpectralGrouper::new()
        .with_seed(args.seed)
        .group_similarity(&similarity, args.groups)?;
    let grouping = match args.grouper {
        GrouperKind::Spectral => spectral_grouping,
        other => other.build(args.seed).group(&model, args.groups)?,
    };
    let submodel = build_submodel(&model, &grouping, fuser.build()?.as_ref())?;
    let scores = submodel.score(&args.ids)?;
    Ok(serde_json::json!({
        "num_layers": model.num_layers(),
        "cosine": similarity.cosine,
        "similarity": similarity.similarity,
        "laplacian": similarity.laplacian,
        "eigenvalues": spectral.eigenvalues,
        "grouper": args.grouper,
        "fuser": fuser,
        "groups": grouping.groups(),
        "ids": args.ids,
        "loss": scores.loss,
        "logits": scores.rows(),
    }))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(json) => {
            let _ = writeln!(std::io::stdout(), "{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
