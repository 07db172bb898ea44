//! Turning text into token ids.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Anything that turns text into token ids.
pub trait TextEncoder {
    /// The ids of `text`, without special tokens added.
    ///
    /// # Errors
    ///
    /// Encoder-specific.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
}

impl TextEncoder for Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Tokenizer::encode(self, text, false)
    }
}

/// One token per UTF-8 byte (ids 0..=255): a tokenizer for byte-level models and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteEncoder;

impl TextEncoder for ByteEncoder {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }
}
