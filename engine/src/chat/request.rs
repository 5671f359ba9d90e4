//! Request-level rendering: an OpenAI chat-completions body to the prompt.
//!
//! Reads `messages`, top-level `tools`, `response_format`, and the thinking switch, which
//! clients spell as `thinking_mode: "thinking" | "chat"` (DeepSeek) or
//! `chat_template_kwargs: {"thinking": true}` (vLLM / SGLang; `enable_thinking` is
//! accepted too). Without either, the request is rendered in chat mode.
//!
//! Key order matters to the prompt: prefer [`render_request_str`] on the raw body.
//! [`render_request`] takes a `serde_json::Value`, whose objects are key-sorted unless
//! serde_json's `preserve_order` feature is enabled in the build.

use super::ChatError;
use super::encode::{EncodeOptions, encode_messages};
use super::json::Json;
use super::types::{Message, ThinkingMode, Tool};

/// The parts of a chat-completions request that shape the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub mode: ThinkingMode,
    /// Rendered into the leading system turn; `{"type": "text"}` counts as none.
    pub response_format: Option<Json>,
}

impl ChatRequest {
    /// Reads a request body, naming the bad field on failure.
    pub fn from_json(body: &Json) -> Result<ChatRequest, ChatError> {
        if !matches!(body, Json::Object(_)) {
            return Err(invalid(
                "",
                format!("expected an object, found {}", body.kind()),
            ));
        }
        let messages = match body.get("messages") {
            Some(Json::Array(items)) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    Message::from_json(item).map_err(|e| ChatError::InvalidMessage {
                        index,
                        field: e.field,
                        reason: e.reason,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Json::Array(_)) => return Err(invalid("messages", "must not be empty")),
            Some(other) => {
                return Err(invalid(
                    "messages",
                    format!("expected an array, found {}", other.kind()),
                ));
            }
            None => return Err(invalid("messages", "missing")),
        };
        let tools = match body.get("tools") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    Tool::from_json(item).map_err(|e| ChatError::InvalidTool {
                        index,
                        field: e.field,
                        reason: e.reason,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(invalid(
                    "tools",
                    format!("expected an array, found {}", other.kind()),
                ));
            }
        };
        let response_format = body
            .get("response_format")
            .filter(|rf| rf.is_truthy() && rf.get("type").and_then(Json::as_str) != Some("text"))
            .cloned();
        Ok(ChatRequest {
            messages,
            tools,
            mode: thinking_mode(body)?,
            response_format,
        })
    }

    /// The prompt text, starting with BOS.
    pub fn render(&self) -> Result<String, ChatError> {
        let opts = EncodeOptions {
            response_format: self.response_format.clone(),
            ..EncodeOptions::default()
        };
        encode_messages(&self.messages, Some(&self.tools), self.mode, &opts)
    }
}

/// Renders a request body held as a `serde_json::Value`.
pub fn render_request(body: &serde_json::Value) -> Result<String, ChatError> {
    ChatRequest::from_json(&Json::from(body))?.render()
}

/// Renders a request body from its JSON text, keeping key order exactly.
pub fn render_request_str(body: &str) -> Result<String, ChatError> {
    let body = Json::parse(body).map_err(|e| invalid("", format!("not valid JSON: {e}")))?;
    ChatRequest::from_json(&body)?.render()
}

fn thinking_mode(body: &Json) -> Result<ThinkingMode, ChatError> {
    match body.get("thinking_mode") {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) if s == "thinking" => return Ok(ThinkingMode::Thinking),
        Some(Json::String(s)) if s == "chat" => return Ok(ThinkingMode::Chat),
        Some(_) => {
            return Err(invalid(
                "thinking_mode",
                "expected \"thinking\" or \"chat\"",
            ));
        }
    }
    let Some(kwargs) = body.get("chat_template_kwargs").filter(|k| !k.is_null()) else {
        return Ok(ThinkingMode::Chat);
    };
    for key in ["thinking", "enable_thinking"] {
        match kwargs.get(key) {
            None | Some(Json::Null) => {}
            Some(Json::Bool(true)) => return Ok(ThinkingMode::Thinking),
            Some(Json::Bool(false)) => return Ok(ThinkingMode::Chat),
            Some(_) => {
                return Err(invalid(
                    &format!("chat_template_kwargs.{key}"),
                    "expected a boolean",
                ));
            }
        }
    }
    Ok(ThinkingMode::Chat)
}

fn invalid(field: &str, reason: impl Into<String>) -> ChatError {
    ChatError::InvalidRequest {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_template_kwargs_thinking_selects_thinking_mode() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"thinking": true}});
        assert!(
            render_request(&body)
                .unwrap()
                .ends_with("<｜Assistant｜><think>")
        );
    }

    #[test]
    fn thinking_mode_field_wins_and_chat_is_the_default() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "thinking_mode": "chat",
            "chat_template_kwargs": {"thinking": true}});
        assert!(render_request(&body).unwrap().ends_with("</think>"));
        let body = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(render_request(&body).unwrap().ends_with("</think>"));
    }

    #[test]
    fn the_raw_body_keeps_tool_schema_key_order() {
        let body = r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]}"#;
        let prompt = render_request_str(body).unwrap();
        assert!(prompt.contains(
            "<functions>\n{\"name\": \"f\", \"description\": \"d\", \"parameters\": {\"type\": \"object\"}}\n</functions>"
        ));
        assert!(prompt.starts_with("<｜begin▁of▁sentence｜>S\n\n## Tools"));
    }

    #[test]
    fn an_unknown_role_names_the_message_index_and_field() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard"}]});
        let err = render_request(&body).unwrap_err();
        assert_eq!(err.param(), "messages[1].role");
        assert!(err.to_string().contains("wizard"));
    }

    #[test]
    fn a_bad_tool_names_its_index() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {}}]});
        assert_eq!(
            render_request(&body).unwrap_err().param(),
            "tools[0].function.name"
        );
    }

    #[test]
    fn missing_or_empty_messages_are_rejected() {
        assert_eq!(render_request(&json!({})).unwrap_err().param(), "messages");
        assert_eq!(
            render_request(&json!({"messages": []}))
                .unwrap_err()
                .param(),
            "messages"
        );
        assert!(render_request_str("{not json").is_err());
    }

    #[test]
    fn a_text_response_format_adds_nothing() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}});
        assert_eq!(
            render_request(&body).unwrap(),
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>"
        );
    }
}
