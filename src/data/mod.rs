//! Training data: instruction and text data sets, prompt formatting, tokenisation with loss
//! masks, client partitions and batches.
//!
//! The flow is `load -> Vec<Example>` ([`load_alpaca`], [`load_sharegpt`], [`load_chitchat`],
//! [`load_plain_text`]),
//! `Example -> TokenizedExample` ([`tokenize_examples`], which keeps the loss on response tokens
//! only), client partitions ([`partition_iid`], [`partition_dirichlet`]) and [`Batch`]es.

mod batch;
mod conversations;
mod examples;
mod partition;
mod text_encoder;

pub use batch::Batch;
pub use conversations::{load_chitchat, load_sharegpt};
pub use examples::{
    Example, TokenizedExample, conversation_examples, load_alpaca, load_plain_text,
    tokenize_examples,
};
pub use partition::{partition_dirichlet, partition_iid};
pub use text_encoder::{ByteEncoder, TextEncoder};
