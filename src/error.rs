//! The crate's single error type.
//!
//! Every fallible public function returns [`Result`]. Variants carry the context a user needs
//! to find the problem: the file, the tensor name, the expected and found shapes.

use std::path::PathBuf;

/// Errors returned by devft.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("I/O error on `{path}`: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON document (config, adapter config, tokenizer) could not be parsed.
    #[error("invalid JSON in `{path}`: {source}")]
    Json {
        /// Where the JSON came from.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A model or adapter configuration is inconsistent or unsupported.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A safetensors file or buffer is malformed (bad header, truncated data, bad offsets).
    #[error("malformed safetensors `{source_name}`: {reason}")]
    MalformedSafetensors {
        /// The file or buffer involved.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A GGUF file is malformed or uses something devft cannot read.
    #[error("GGUF `{source_name}`: {reason}")]
    Gguf {
        /// The file involved.
        source_name: String,
        /// What is wrong (bad magic, unsupported version or quant type, truncated data, ...).
        reason: String,
    },
    /// An asset could not be fetched or failed its checksum.
    #[error("fetching {asset}: {reason}")]
    Fetch {
        /// The asset (package and file).
        asset: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor the model needs is absent from the checkpoint or adapter.
    #[error("missing tensor `{name}`")]
    MissingTensor {
        /// The tensor's name as the checkpoint spells it.
        name: String,
    },
    /// A checkpoint or adapter holds a tensor the model has no place for.
    #[error("unexpected tensor `{name}`")]
    UnexpectedTensor {
        /// The tensor's name as the checkpoint spells it.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape that was found.
        found: Vec<usize>,
    },
    /// A tensor is stored in a data type devft cannot read.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor's name.
        name: String,
        /// The data type found.
        dtype: String,
    },
    /// A tensor holds NaN or infinite values where finite ones are required.
    #[error("tensor `{name}` contains non-finite values")]
    NonFinite {
        /// The tensor's name.
        name: String,
    },
    /// A LoRA adapter is inconsistent with its own configuration or with the model.
    #[error("invalid adapter: {0}")]
    InvalidAdapter(String),
    /// The tokenizer could not be loaded or failed to encode or decode.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A run checkpoint is inconsistent with itself or with the run resuming it.
    #[error("checkpoint `{path}`: {reason}")]
    InvalidCheckpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A client's update was refused by the server (its values or norm are out of bounds).
    #[error("update of client {client} rejected: {reason}")]
    RejectedUpdate {
        /// The client.
        client: usize,
        /// Why.
        reason: String,
    },
    /// A protocol message is malformed, truncated, oversized, of another kind or version, or
    /// inconsistent with its header.
    #[error("invalid message from {sender}: {reason}")]
    InvalidMessage {
        /// Who sent it.
        sender: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A caller passed an argument outside its documented domain.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Shorthand for `std::result::Result<T, devft::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The same error with `prefix` before the tensor name it carries (for errors found on a
    /// part, such as one layer, reported in the whole's naming).
    pub(crate) fn with_name_prefix(self, prefix: &str) -> Self {
        let named = |name: String| format!("{prefix}{name}");
        match self {
            Error::MissingTensor { name } => Error::MissingTensor { name: named(name) },
            Error::UnexpectedTensor { name } => Error::UnexpectedTensor { name: named(name) },
            Error::ShapeMismatch {
                name,
                expected,
                found,
            } => Error::ShapeMismatch {
                name: named(name),
                expected,
                found,
            },
            Error::NonFinite { name } => Error::NonFinite { name: named(name) },
            other => other,
        }
    }

    /// The same error with `file` named in the message of an [`Error::InvalidConfig`] (for
    /// errors found by code that does not know which file the values came from).
    pub(crate) fn in_file(self, file: &str) -> Self {
        match self {
            Error::InvalidConfig(msg) => Error::InvalidConfig(format!("`{file}`: {msg}")),
            other => other,
        }
    }

    /// Builds an [`Error::Json`] for `path`.
    pub(crate) fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Error::Json {
            path: path.into(),
            source,
        }
    }
}
