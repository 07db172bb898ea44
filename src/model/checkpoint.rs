//! HuggingFace checkpoints on disk: `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped, with f32, f16 and bf16 tensors.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::params::{HostTensor, SafetensorsHeader, TensorSource};

/// One memory-mapped safetensors file.
struct Shard {
    mmap: Mmap,
    header: SafetensorsHeader,
}

/// A checkpoint of one or more safetensors shards whose tensors are decoded on demand.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name to shard index.
    index: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a `.safetensors.index.json` file, or a
    /// directory holding `model.safetensors` or `model.safetensors.index.json`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when no checkpoint is found or a file cannot be read,
    /// [`Error::Json`] for a bad index, [`Error::MalformedSafetensors`] for a bad shard, and
    /// [`Error::MissingTensor`] when the index names a tensor its shard lacks.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if single.exists() {
                return Self::open_files(&[single]);
            }
            if index.exists() {
                return Self::open_index(&index);
            }
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            ));
        }
        if path.to_string_lossy().ends_with(".index.json") {
            Self::open_index(path)
        } else {
            Self::open_files(&[path.to_path_buf()])
        }
    }

    fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| Error::json(index_path, e))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = index.weight_map.values().cloned().collect();
        files.sort();
        files.dedup();
        if let Some(outside) = files.iter().find(|f| !is_plain_file_name(f)) {
            return Err(Error::InvalidConfig(format!(
                "`{}`: shard `{outside}` is not a file name in the model's directory",
                index_path.display()
            )));
        }
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let checkpoint = Self::open_files(&paths)?;
        for (name, file) in &index.weight_map {
            let shard = files
                .iter()
                .position(|f| f == file)
                .expect("file listed above");
            if checkpoint.index.get(name) != Some(&shard) {
                return Err(Error::MissingTensor {
                    name: format!("{name} (in {file})"),
                });
            }
        }
        Ok(checkpoint)
    }

    fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            let header = SafetensorsHeader::parse(&mmap, &path.display().to_string())?;
            for name in header.names() {
                index.insert(name, i);
            }
            shards.push(Shard { mmap, header });
        }
        Ok(Self { shards, index })
    }
}

/// Whether `name` names a file directly inside a directory: one normal path component, so
/// neither absolute, nor `..`, nor in a subdirectory.
fn is_plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

/// Memory-maps the regular file at `path` read-only.
///
/// # Errors
///
/// [`Error::Io`] when it cannot be opened or mapped, or is not a regular file (a directory
/// would otherwise fail to map with the kernel's "No such device").
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
    if !metadata.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    // SAFETY: the map is read-only; the file is not expected to change while open.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl TensorSource for Checkpoint {
    fn tensor_names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn load_tensor(&self, name: &str) -> Result<HostTensor> {
        let shard = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let shard = &self.shards[*shard];
        shard.header.tensor(&shard.mmap, name)
    }
}
