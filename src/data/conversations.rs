//! Conversation data sets: ShareGPT-style (`conversations: [{from, value}]`) and the chitchat
//! data set (`uuid -> {messages: [[{text, sender, ...}] per turn], prompt}`), turned into one
//! training example per assistant turn.

use std::path::Path;

use serde::Deserialize;

use crate::data::Example;
use crate::data::examples::{conversation_examples, read_records};
use crate::error::{Error, Result};
use crate::tokenizer::{ChatTurn, PromptTemplate, Role};

#[derive(Deserialize)]
struct ShareGptRecord {
    conversations: Vec<ShareGptTurn>,
    #[serde(default)]
    category: Option<String>,
}

#[derive(Deserialize)]
struct ShareGptTurn {
    from: String,
    value: String,
}

/// Loads ShareGPT-style records (a JSON array, or JSONL) whose `from` is `system`, `human` /
/// `user` or `gpt` / `assistant`; other speakers are an error naming them.
///
/// # Errors
///
/// [`Error::Io`], [`Error::Json`], or [`Error::InvalidArgument`] for an unknown speaker.
pub fn load_sharegpt(path: impl AsRef<Path>, template: PromptTemplate) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let records: Vec<ShareGptRecord> = read_records(path)?;
    let mut examples = Vec::new();
    for record in records {
        let turns = record
            .conversations
            .into_iter()
            .map(|t| {
                let role = match t.from.as_str() {
                    "system" => Role::System,
                    "human" | "user" => Role::User,
                    "gpt" | "assistant" => Role::Assistant,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "{}: unknown speaker `{other}`",
                            path.display()
                        )));
                    }
                };
                Ok(ChatTurn::new(role, t.value))
            })
            .collect::<Result<Vec<_>>>()?;
        examples.extend(conversation_examples(
            &turns,
            template,
            record.category.as_deref(),
            None,
        ));
    }
    Ok(examples)
}

#[derive(Deserialize)]
struct ChitchatConversation {
    messages: Vec<Vec<ChitchatMessage>>,
    #[serde(default)]
    prompt: Option<String>,
}

#[derive(Deserialize)]
struct ChitchatMessage {
    text: String,
    sender: String,
}

/// Loads the chitchat data set: each conversation's first speaker becomes the user, the other
/// the assistant; the messages of one turn are joined by newlines; the example label is the
/// conversation's `prompt` topic (empty when it has none), for non-IID splits by topic.
/// Prompts hold the last `history` turns before each answer (all earlier turns for `None`).
/// Conversations are taken in key order, so the result is deterministic.
///
/// # Errors
///
/// [`Error::Io`] or [`Error::Json`].
pub fn load_chitchat(
    path: impl AsRef<Path>,
    template: PromptTemplate,
    history: Option<usize>,
) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let data: std::collections::BTreeMap<String, ChitchatConversation> =
        serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
    let mut examples = Vec::new();
    for conversation in data.into_values() {
        let Some(first) = conversation
            .messages
            .iter()
            .flatten()
            .next()
            .map(|m| m.sender.clone())
        else {
            continue;
        };
        let turns: Vec<ChatTurn> = conversation
            .messages
            .iter()
            .filter(|turn| !turn.is_empty())
            .map(|turn| {
                let role = if turn[0].sender == first {
                    Role::User
                } else {
                    Role::Assistant
                };
                let text: Vec<&str> = turn.iter().map(|m| m.text.trim()).collect();
                ChatTurn::new(role, text.join("\n"))
            })
            .collect();
        let label = conversation.prompt.unwrap_or_default();
        examples.extend(conversation_examples(
            &turns,
            template,
            Some(&label),
            history,
        ));
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chitchat_turns_become_user_and_assistant_examples() {
        let dir = std::env::temp_dir().join(format!("devft-chitchat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dataset.json");
        let json = r#"{"b": {"messages": [[{"text": "Hello", "sender": "u1"}, {"text": "How are you?", "sender": "u1"}],
                                  [{"text": "Fine", "sender": "u2"}],
                                  [{"text": "Good", "sender": "u1"}],
                                  [{"text": "Bye", "sender": "u2"}]], "prompt": "greetings"},
                       "a": {"messages": [], "prompt": null}}"#;
        std::fs::write(&path, json).unwrap();
        let examples = load_chitchat(&path, PromptTemplate::ChatMl, None).unwrap();
        assert_eq!(examples.len(), 2);
        assert_eq!(
            examples[0].prompt,
            "<|im_start|>user\nHello\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(examples[0].response, "Fine<|im_end|>");
        assert_eq!(examples[1].response, "Bye<|im_end|>");
        assert!(
            examples[1]
                .prompt
                .contains("<|im_start|>user\nGood<|im_end|>")
        );
        assert_eq!(examples[0].label.as_deref(), Some("greetings"));
        let recent = load_chitchat(&path, PromptTemplate::ChatMl, Some(1)).unwrap();
        assert_eq!(
            recent[1].prompt,
            "<|im_start|>user\nGood<|im_end|>\n<|im_start|>assistant\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sharegpt_rejects_unknown_speakers() {
        let dir = std::env::temp_dir().join(format!("devft-sharegpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.jsonl");
        std::fs::write(&path, r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#).unwrap();
        let examples = load_sharegpt(&path, PromptTemplate::ChatMl).unwrap();
        assert_eq!(examples.len(), 1);
        assert_eq!(examples[0].response, "Hello<|im_end|>");
        std::fs::write(
            &path,
            r#"{"conversations": [{"from": "robot", "value": "Hi"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            load_sharegpt(&path, PromptTemplate::ChatMl),
            Err(Error::InvalidArgument(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
