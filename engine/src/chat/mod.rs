//! DeepSeek-V3.2 chat format: OpenAI chat requests to prompt text, and completions back
//! to reasoning, content and tool calls.
//!
//! Ports DeepSeek's `encoding_dsv32.py` (there is no Jinja template for V3.2). Owns:
//! the message types ([`types`]), key-order-preserving JSON ([`json`]), the encoder
//! ([`encode`]), the completion parser with its streaming form ([`parse`]) and the
//! request-level entry point [`render_request`]. Everything here is pure: no I/O, no
//! tokenizer (the prompt is text; BOS is emitted as text and tokenized as a special token).

pub mod encode;
pub mod json;
pub mod parse;
pub mod request;
pub mod types;

pub use encode::{EncodeOptions, encode_messages};
pub use json::Json;
pub use parse::{Delta, ParsedMessage, StreamParser, parse_completion};
pub use request::{ChatRequest, render_request, render_request_str};
pub use types::{FieldError, Message, Role, ThinkingMode, Tool, ToolCall};

use thiserror::Error;

/// The literal special strings of the format.
pub mod tokens {
    pub const BOS: &str = "<｜begin▁of▁sentence｜>";
    pub const EOS: &str = "<｜end▁of▁sentence｜>";
    pub const USER: &str = "<｜User｜>";
    pub const ASSISTANT: &str = "<｜Assistant｜>";
    pub const THINK_START: &str = "<think>";
    pub const THINK_END: &str = "</think>";
    /// Prefix of every tool-call tag (`<｜DSML｜function_calls>`); plain text to the tokenizer.
    pub const DSML: &str = "｜DSML｜";
}

/// Why a conversation could not be rendered. Messages name the offending field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChatError {
    #[error("messages[{index}]{}: {reason}", dotted(field))]
    InvalidMessage {
        index: usize,
        field: String,
        reason: String,
    },
    #[error("tools[{index}]{}: {reason}", dotted(field))]
    InvalidTool {
        index: usize,
        field: String,
        reason: String,
    },
    #[error("{field}: {reason}")]
    InvalidRequest { field: String, reason: String },
}

fn dotted(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!(".{field}")
    }
}

impl ChatError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ChatError::InvalidMessage { .. } => "invalid_message",
            ChatError::InvalidTool { .. } => "invalid_tool",
            ChatError::InvalidRequest { .. } => "invalid_request",
        }
    }

    /// The request path of the bad field, for OpenAI's `error.param`.
    pub fn param(&self) -> String {
        match self {
            ChatError::InvalidMessage { index, field, .. } => {
                format!("messages[{index}]{}", dotted(field))
            }
            ChatError::InvalidTool { index, field, .. } => {
                format!("tools[{index}]{}", dotted(field))
            }
            ChatError::InvalidRequest { field, .. } => field.clone(),
        }
    }
}
