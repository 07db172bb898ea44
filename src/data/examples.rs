//! Examples as prompt/response text, their loaders, and tokenisation with loss masks.

use std::path::Path;

use serde::Deserialize;

use crate::data::TextEncoder;
use crate::error::{Error, Result};
use crate::tokenizer::{ChatTurn, PromptTemplate, Role};

/// One training example: a prompt and the response the model should learn. Plain text has an
/// empty prompt (every token is a target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Text the model conditions on (no loss).
    pub prompt: String,
    /// Text the model learns to produce (loss).
    pub response: String,
    /// A label for non-IID partitioning (topic, category, source); `None` if unknown.
    pub label: Option<String>,
}

/// A tokenised example: ids and which of them are targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Token ids, prompt then response.
    pub ids: Vec<u32>,
    /// `true` for response tokens (the loss is computed on them only).
    pub targets: Vec<bool>,
    /// The example's partition label.
    pub label: Option<String>,
}

#[derive(Deserialize)]
struct AlpacaRecord {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
    #[serde(default, alias = "category")]
    label: Option<String>,
}

/// Loads Alpaca-style records (`instruction`, optional `input`, `output`, optional
/// `category`/`label`) from a JSON array or a JSONL file; the prompt is rendered with
/// `template`.
///
/// # Errors
///
/// [`Error::Io`], or [`Error::Json`] naming the file (and the line, for JSONL).
pub fn load_alpaca(path: impl AsRef<Path>, template: PromptTemplate) -> Result<Vec<Example>> {
    let records: Vec<AlpacaRecord> = read_records(path.as_ref())?;
    Ok(records
        .into_iter()
        .map(|r| {
            let user = PromptTemplate::alpaca_user_turn(&r.instruction, &r.input);
            Example {
                prompt: template.render(&[user], true),
                response: format!("{}{}", r.output, template.end_of_turn()),
                label: r.label,
            }
        })
        .collect())
}

/// Reads records from a JSON array or from JSON Lines (one record per non-empty line).
pub(crate) fn read_records<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| Error::json(path, e))
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| serde_json::from_str(line).map_err(|e| Error::json(path, e)))
            .collect()
    }
}

/// Loads plain text, split into paragraphs (blank-line separated); every token is a target.
///
/// # Errors
///
/// [`Error::Io`].
pub fn load_plain_text(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| Example {
            prompt: String::new(),
            response: p.to_string(),
            label: None,
        })
        .collect())
}

/// Tokenises examples, truncating each to `max_len` tokens; examples left with no target
/// token (prompt longer than `max_len`) are dropped.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when `max_len < 2`, and encoder errors.
pub fn tokenize_examples(
    examples: &[Example],
    encoder: &dyn TextEncoder,
    max_len: usize,
) -> Result<Vec<TokenizedExample>> {
    if max_len < 2 {
        return Err(Error::InvalidArgument("max_len must be at least 2".into()));
    }
    let mut out = Vec::with_capacity(examples.len());
    for example in examples {
        let prompt = encoder.encode(&example.prompt)?;
        let response = encoder.encode(&example.response)?;
        let mut ids = prompt.clone();
        ids.extend(&response);
        let mut targets = vec![false; prompt.len()];
        targets.extend(std::iter::repeat_n(true, response.len()));
        ids.truncate(max_len);
        targets.truncate(max_len);
        // The first token is never predicted; keep examples with something to learn.
        if ids.len() >= 2 && targets[1..].iter().any(|&t| t) {
            out.push(TokenizedExample {
                ids,
                targets,
                label: example.label.clone(),
            });
        }
    }
    Ok(out)
}

/// A chat conversation as one example per assistant turn: the prompt is the earlier turns
/// rendered with `template` (all of them, or the last `history` when given), the response
/// that turn.
///
/// ```
/// use devft::data::conversation_examples;
/// use devft::tokenizer::{ChatTurn, PromptTemplate, Role};
///
/// let turns = [
///     ChatTurn::new(Role::User, "Hi"),
///     ChatTurn::new(Role::Assistant, "Hello!"),
///     ChatTurn::new(Role::User, "How are you?"),
///     ChatTurn::new(Role::Assistant, "Fine."),
/// ];
/// let examples = conversation_examples(&turns, PromptTemplate::ChatMl, None, Some(1));
/// assert_eq!(examples.len(), 2);
/// assert_eq!(
///     examples[1].prompt,
///     "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
/// );
/// assert_eq!(examples[1].response, "Fine.<|im_end|>");
/// ```
pub fn conversation_examples(
    turns: &[ChatTurn],
    template: PromptTemplate,
    label: Option<&str>,
    history: Option<usize>,
) -> Vec<Example> {
    turns
        .iter()
        .enumerate()
        .filter(|(i, t)| t.role == Role::Assistant && *i > 0)
        .map(|(i, t)| {
            let first = history.map_or(0, |h| i.saturating_sub(h.max(1)));
            Example {
                prompt: template.render(&turns[first..i], true),
                response: format!("{}{}", t.content, template.end_of_turn()),
                label: label.map(str::to_string),
            }
        })
        .collect()
}
