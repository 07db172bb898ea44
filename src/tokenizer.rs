//! Tokenizers and prompt templates.
//!
//! [`Tokenizer`] wraps the `tokenizers` crate (pure Rust, `fancy-regex`) and reads HuggingFace's
//! `tokenizer.json`, so ids are identical to Python's. [`PromptTemplate`] formats chat turns and
//! Alpaca-style instructions the way the common model families expect.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A HuggingFace tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file is missing, [`Error::Tokenizer`] when it cannot be parsed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes)
    }

    /// Parses the contents of a `tokenizer.json`.
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] when the JSON is not a valid tokenizer.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        tokenizers::Tokenizer::from_bytes(bytes)
            .map(|inner| Self { inner })
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Builds the byte-level BPE tokenizer stored in a GGUF file (`tokenizer.ggml.model =
    /// gpt2`): vocabulary from `tokenizer.ggml.tokens`, merges from `tokenizer.ggml.merges`,
    /// and every token of type 3 (control) as a special token matched before BPE. The
    /// pre-tokenizer is GPT-2's byte-level split, as transformers builds it from GGUF.
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] when the model is not `gpt2` or the vocabulary or merges are
    /// missing or malformed.
    pub fn from_gguf(file: &crate::model::gguf::GgufFile) -> Result<Self> {
        use crate::model::gguf::GgufValue;
        use tokenizers::models::bpe::{BPE, Vocab};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;

        let bad = |what: &str| Error::Tokenizer(format!("GGUF tokenizer: {what}"));
        let model = file
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str);
        if model != Some("gpt2") {
            return Err(bad(&format!(
                "model {model:?} is not supported (gpt2 byte-level BPE is)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match file.metadata.get(key) {
                Some(GgufValue::Array(items)) => items
                    .strings()
                    .map(<[String]>::to_vec)
                    .ok_or_else(|| bad(&format!("{key} is not an array of strings"))),
                _ => Err(bad(&format!("{key} is missing"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(&format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<u64> = match file.metadata.get("tokenizer.ggml.token_type") {
            Some(GgufValue::Array(items)) => {
                items.iter().map(|v| v.as_u64().unwrap_or(1)).collect()
            }
            _ => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3)
            .map(|(token, _)| tokenizers::AddedToken::from(token.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(Self { inner })
    }

    /// Wraps an already built `tokenizers::Tokenizer`.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    /// Encodes `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (e.g. a BOS token).
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] when encoding fails.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Decodes `ids` back to text.
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] when decoding fails.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token string, e.g. `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Who speaks a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System instructions.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl ChatTurn {
    /// A turn of `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
    /// `[INST] user [/INST] assistant</s>` (Llama 2 chat, Mistral instruct).
    Inst,
    /// Stanford Alpaca's `### Instruction:` / `### Response:` format.
    Alpaca,
}

impl PromptTemplate {
    /// Renders `turns`; with `add_generation_prompt`, ends with the opening of an assistant
    /// turn so that the model's continuation is its answer.
    pub fn render(&self, turns: &[ChatTurn], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
            PromptTemplate::ChatMl => {
                for turn in turns {
                    out += &format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        role_name(turn.role),
                        turn.content
                    );
                }
                if add_generation_prompt {
                    out += "<|im_start|>assistant\n";
                }
            }
            PromptTemplate::Llama3 => {
                out += "<|begin_of_text|>";
                for turn in turns {
                    out += &format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        role_name(turn.role),
                        turn.content.trim()
                    );
                }
                if add_generation_prompt {
                    out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                }
            }
            PromptTemplate::Inst => {
                out += "<s>";
                let mut system = String::new();
                for turn in turns {
                    match turn.role {
                        Role::System => system = format!("{}\n\n", turn.content),
                        Role::User => {
                            out += &format!("[INST] {system}{} [/INST]", turn.content);
                            system.clear();
                        }
                        Role::Assistant => out += &format!(" {}</s>", turn.content),
                    }
                }
            }
            PromptTemplate::Alpaca => {
                let mut instruction = String::new();
                for turn in turns {
                    match turn.role {
                        Role::System => out += &format!("{}\n\n", turn.content),
                        Role::User => instruction = turn.content.clone(),
                        Role::Assistant => {
                            out += &format!(
                                "### Instruction:\n{instruction}\n\n### Response:\n{}\n\n",
                                turn.content
                            )
                        }
                    }
                }
                if add_generation_prompt {
                    out += &format!("### Instruction:\n{instruction}\n\n### Response:\n");
                }
            }
        }
        out
    }

    /// The end-of-turn marker the model emits after an answer.
    pub fn end_of_turn(&self) -> &'static str {
        match self {
            PromptTemplate::ChatMl => "<|im_end|>",
            PromptTemplate::Llama3 => "<|eot_id|>",
            PromptTemplate::Inst => "</s>",
            PromptTemplate::Alpaca => "\n\n",
        }
    }

    /// Formats an Alpaca-style record (instruction, optional input) as a user turn.
    pub fn alpaca_user_turn(instruction: &str, input: &str) -> ChatTurn {
        let content = if input.trim().is_empty() {
            instruction.to_string()
        } else {
            format!("{instruction}\n\n{input}")
        };
        ChatTurn::new(Role::User, content)
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_matches_smollm2_layout() {
        let turns = [ChatTurn::new(Role::User, "What is the capital of France?")];
        assert_eq!(
            PromptTemplate::ChatMl.render(&turns, true),
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn alpaca_puts_input_after_instruction() {
        let user = PromptTemplate::alpaca_user_turn("Translate", "bonjour");
        let text = PromptTemplate::Alpaca.render(&[user], true);
        assert_eq!(
            text,
            "### Instruction:\nTranslate\n\nbonjour\n\n### Response:\n"
        );
    }
}
