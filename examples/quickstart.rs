//! The crate's current main job: load a HuggingFace model and a PEFT adapter, report the
//! adapter's effect on the next-token loss, and generate greedily with a KV cache.
//!
//! ```text
//! cargo run --release --example quickstart [-- --model DIR --adapter DIR --prompt 1,2,3]
//! ```
//!
//! Defaults to the tiny Llama fixture shipped in `tests/fixtures/tiny-llama` (random weights
//! made with transformers and PEFT), so it runs offline with no download. A later release makes
//! the main job a full federated DevFT run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use devft::model::{CausalLm, import_adapter};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");

/// Load a model and adapter, compare losses, generate.
#[derive(Parser, Debug)]
struct Args {
    /// HuggingFace model directory.
    #[arg(long, default_value = FIXTURE)]
    model: PathBuf,
    /// PEFT adapter directory (default: the fixture's adapter when the fixture model is used).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated prompt token ids.
    #[arg(long, value_delimiter = ',', default_value = "1,10,20,30,40")]
    prompt: Vec<u32>,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Backend: flex, ndarray, tch, wgpu or cuda (those enabled as features).
    #[arg(long, default_value = "flex")]
    device: String,
}

fn run(args: Args) -> devft::Result<()> {
    let device = devft::device::device_from_name(&args.device)?;
    let started = Instant::now();
    let base = CausalLm::load(&args.model, &device)?;
    let adapter = args.adapter.clone().or_else(|| {
        (args.model == std::path::Path::new(FIXTURE)).then(|| args.model.join("adapter"))
    });
    let config = base.config();
    println!(
        "model: {} layers, hidden {}, {} heads ({} KV), vocab {} (loaded in {:.2?})",
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.vocab_size,
        started.elapsed()
    );
    model_report("base", &base, &args)?;
    if let Some(adapter) = adapter {
        let tuned = import_adapter(&base, &adapter)?;
        let lora = tuned
            .lora_config()
            .expect("imported adapters carry a config");
        println!(
            "adapter: r = {}, alpha = {}, {} tensors, {} trainable values",
            lora.r,
            lora.lora_alpha,
            tuned.lora_params().len(),
            tuned.lora_params().num_values()
        );
        model_report("base + adapter", &tuned, &args)?;
    }
    Ok(())
}

fn model_report(label: &str, model: &CausalLm, args: &Args) -> devft::Result<()> {
    model.check_ids(&args.prompt)?;
    let started = Instant::now();
    let generated = model.generate_greedy(&args.prompt, args.max_new_tokens, &[])?;
    let elapsed = started.elapsed();
    println!(
        "{label}: prompt loss {:.4}, greedy continuation {:?} ({:.1} tokens/s)",
        model.score(&args.prompt)?.loss.unwrap_or(f32::NAN),
        generated,
        generated.len() as f64 / elapsed.as_secs_f64()
    );
    Ok(())
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
