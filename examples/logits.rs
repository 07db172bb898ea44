//! Prints, as JSON, the logits and mean next-token loss of a HuggingFace model (optionally with
//! a PEFT adapter) for token ids given on the command line, so that devft can be checked against
//! any other implementation on any checkpoint.
//!
//! ```text
//! cargo run --release --example logits -- --model DIR [--adapter DIR] --ids 1,2,3 [--device flex]
//! ```
//!
//! Output: `{"ids": [...], "logits": [[...vocab...] per position], "loss": f, "vocab_size": n}`.
//! `loss` is the mean cross-entropy of predicting token t+1 from positions 0..t (transformers'
//! `model(ids, labels=ids).loss`); it is `null` for a single id.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use devft::model::{CausalLm, import_adapter};

/// Logits and loss of a model on given token ids, as JSON.
#[derive(Parser, Debug)]
struct Args {
    /// HuggingFace model directory (config.json + model.safetensors or a sharded index), or a
    /// `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Backend: flex, ndarray, tch, wgpu or cuda (those enabled as features).
    #[arg(long, default_value = "flex")]
    device: String,
}

fn run(args: Args) -> devft::Result<serde_json::Value> {
    let device = devft::device::device_from_name(&args.device)?;
    let mut model = CausalLm::load(&args.model, &device)?;
    if let Some(adapter) = &args.adapter {
        model = import_adapter(&model, adapter)?;
    }
    let scores = model.score(&args.ids)?;
    Ok(serde_json::json!({
        "ids": args.ids,
        "vocab_size": model.config().vocab_size,
        "loss": scores.loss,
        "logits": scores.rows(),
    }))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(json) => {
            // A closed pipe (e.g. `| head`) is not an error of this program.
            let _ = writeln!(std::io::stdout(), "{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
