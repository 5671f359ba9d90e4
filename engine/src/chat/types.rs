//! Chat message types as OpenAI chat-completions JSON spells them.
//!
//! Messages and tools deserialize through [`Json`] so that key order survives (it is part
//! of the rendered prompt), and so that a bad field is reported by name rather than as a
//! serde position. [`FieldError`] carries the field path inside one message or tool; the
//! caller adds the index.

use super::json::Json;
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// Whether the assistant opens a `<think>` block after the last user turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThinkingMode {
    /// Non-thinking: the prompt closes the think block (`</think>`) before the answer.
    #[default]
    Chat,
    /// Thinking: the prompt ends with `<think>` and the model reasons first.
    Thinking,
}

/// A chat role known to the DeepSeek-V3.2 format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
    /// DeepSeek's agent role: rendered as a user turn carrying tools and the task.
    Developer,
}

impl Role {
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            "developer" => Some(Role::Developer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Developer => "developer",
        }
    }
}

/// One call the assistant made: OpenAI's `{id, type: "function", function: {name, arguments}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Absent in replayed history from some clients; always set on parsed completions.
    pub id: Option<String>,
    pub name: String,
    /// The arguments object as JSON text, as OpenAI transports it.
    pub arguments: String,
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
        .serialize(serializer)
    }
}

/// A function the model may call: OpenAI's `{type: "function", function: {...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Json")]
pub struct Tool {
    /// The `function` object as sent (`name`, `description`, `parameters`, ...), in key
    /// order: the prompt shows it verbatim.
    pub function: Json,
}

impl Tool {
    pub fn name(&self) -> &str {
        self.function
            .get("name")
            .and_then(Json::as_str)
            .unwrap_or_default()
    }

    /// Reads one tool, naming the bad field on failure.
    pub fn from_json(value: &Json) -> Result<Tool, FieldError> {
        expect_object(value, "")?;
        if let Some(kind) = value.get("type").filter(|v| !v.is_null())
            && kind.as_str() != Some("function")
        {
            return Err(FieldError::new(
                "type",
                "only \"function\" tools are supported",
            ));
        }
        let function = value
            .get("function")
            .ok_or_else(|| FieldError::new("function", "missing"))?;
        expect_object(function, "function")?;
        match function.get("name") {
            Some(Json::String(name)) if !name.is_empty() => {}
            Some(Json::String(_)) => return Err(FieldError::new("function.name", "empty")),
            Some(other) => return Err(FieldError::expected("function.name", "a string", other)),
            None => return Err(FieldError::new("function.name", "missing")),
        }
        Ok(Tool {
            function: function.clone(),
        })
    }
}

impl TryFrom<Json> for Tool {
    type Error = FieldError;
    fn try_from(value: Json) -> Result<Tool, FieldError> {
        Tool::from_json(&value)
    }
}

/// One chat message. Text content parts are joined with `"\n"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Json")]
pub struct Message {
    pub role: Role,
    pub content: Option<String>,
    /// Accepted for OpenAI compatibility; the DeepSeek format does not render it.
    pub name: Option<String>,
    pub reasoning_content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
    /// Tools declared on this message (system or developer), as in DeepSeek's own inputs.
    pub tools: Vec<Tool>,
    /// A schema the reply must follow, rendered on system and developer turns.
    pub response_format: Option<Json>,
}

impl Message {
    /// A message with only a role and text content.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: Some(content.into()),
            name: None,
            reasoning_content: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            tools: Vec::new(),
            response_format: None,
        }
    }

    /// Reads one message, naming the bad field on failure.
    pub fn from_json(value: &Json) -> Result<Message, FieldError> {
        expect_object(value, "")?;
        let role = match value.get("role") {
            Some(Json::String(name)) => Role::parse(name).ok_or_else(|| {
                FieldError::new(
                    "role",
                    format!(
                        "unknown role {name:?} (expected system, user, assistant, tool or developer)"
                    ),
                )
            })?,
            Some(other) => return Err(FieldError::expected("role", "a string", other)),
            None => return Err(FieldError::new("role", "missing")),
        };
        let tool_calls = match value.get("tool_calls") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    tool_call_from_json(item).map_err(|e| e.within(&format!("tool_calls[{i}]")))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(FieldError::expected("tool_calls", "an array", other)),
        };
        let tools = match value.get("tools") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    Tool::from_json(item).map_err(|e| e.within(&format!("tools[{i}]")))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(FieldError::expected("tools", "an array", other)),
        };
        Ok(Message {
            role,
            content: content_from_json(value.get("content"))?,
            name: optional_string(value, "name")?,
            reasoning_content: optional_string(value, "reasoning_content")?,
            tool_calls,
            tool_call_id: optional_string(value, "tool_call_id")?,
            tools,
            response_format: value
                .get("response_format")
                .filter(|v| !v.is_null())
                .cloned(),
        })
    }
}

impl TryFrom<Json> for Message {
    type Error = FieldError;
    fn try_from(value: Json) -> Result<Message, FieldError> {
        Message::from_json(&value)
    }
}

fn tool_call_from_json(value: &Json) -> Result<ToolCall, FieldError> {
    expect_object(value, "")?;
    let id = optional_string(value, "id")?;
    if let Some(kind) = value.get("type").filter(|v| !v.is_null())
        && kind.as_str() != Some("function")
    {
        return Err(FieldError::new(
            "type",
            "only \"function\" tool calls are supported",
        ));
    }
    let function = value
        .get("function")
        .ok_or_else(|| FieldError::new("function", "missing"))?;
    expect_object(function, "function")?;
    let name = match function.get("name") {
        Some(Json::String(name)) => name.clone(),
        Some(other) => return Err(FieldError::expected("function.name", "a string", other)),
        None => return Err(FieldError::new("function.name", "missing")),
    };
    let arguments = match function.get("arguments") {
        None | Some(Json::Null) => "{}".to_owned(),
        Some(Json::String(text)) => text.clone(),
        Some(object @ Json::Object(_)) => object.to_python_json(),
        Some(other) => {
            return Err(FieldError::expected(
                "function.arguments",
                "a JSON string",
                other,
            ));
        }
    };
    Ok(ToolCall {
        id,
        name,
        arguments,
    })
}

fn content_from_json(value: Option<&Json>) -> Result<Option<String>, FieldError> {
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(text)) => Ok(Some(text.clone())),
        Some(Json::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                let field = format!("content[{i}]");
                match part.get("type").and_then(Json::as_str) {
                    Some("text") => match part.get("text") {
                        Some(Json::String(text)) => texts.push(text.as_str()),
                        Some(other) => {
                            return Err(FieldError::expected(
                                &format!("{field}.text"),
                                "a string",
                                other,
                            ));
                        }
                        None => return Err(FieldError::new(&format!("{field}.text"), "missing")),
                    },
                    Some(kind) => {
                        return Err(FieldError::new(
                            &format!("{field}.type"),
                            format!("unsupported content part {kind:?} (only \"text\")"),
                        ));
                    }
                    None => return Err(FieldError::new(&format!("{field}.type"), "missing")),
                }
            }
            Ok(Some(texts.join("\n")))
        }
        Some(other) => Err(FieldError::expected(
            "content",
            "a string or an array of parts",
            other,
        )),
    }
}

fn optional_string(value: &Json, key: &str) -> Result<Option<String>, FieldError> {
    match value.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(FieldError::expected(key, "a string", other)),
    }
}

fn expect_object(value: &Json, field: &str) -> Result<(), FieldError> {
    match value {
        Json::Object(_) => Ok(()),
        other => Err(FieldError::expected(field, "an object", other)),
    }
}

/// A problem with one field of a message or tool; `field` is a path such as
/// `tool_calls[0].function.arguments` (empty for the value itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &str, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    fn expected(field: &str, what: &str, found: &Json) -> FieldError {
        FieldError::new(field, format!("expected {what}, found {}", found.kind()))
    }

    /// Prefixes the path with the enclosing field.
    fn within(self, outer: &str) -> FieldError {
        let field = if self.field.is_empty() {
            outer.to_owned()
        } else {
            format!("{outer}.{}", self.field)
        };
        FieldError {
            field,
            reason: self.reason,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> Result<Message, FieldError> {
        Message::from_json(&Json::parse(text).unwrap())
    }

    #[test]
    fn openai_messages_deserialize_with_text_parts_joined() {
        let m: Message = serde_json::from_str(
            r#"{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.role, Role::User);
        assert_eq!(m.content.as_deref(), Some("a\nb"));
    }

    #[test]
    fn tool_calls_deserialize_with_string_or_object_arguments() {
        let m = message(
            r#"{"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                {"id": null, "type": "function", "function": {"name": "g", "arguments": {"y": "z", "a": 2}}}]}"#,
        )
        .unwrap();
        assert_eq!(m.tool_calls[0].arguments, r#"{"x": 1}"#);
        assert_eq!(m.tool_calls[1].id, None);
        assert_eq!(m.tool_calls[1].arguments, r#"{"y": "z", "a": 2}"#);
    }

    #[test]
    fn an_unknown_role_is_reported_on_the_role_field() {
        let err = message(r#"{"role": "robot", "content": "x"}"#).unwrap_err();
        assert_eq!(err.field, "role");
        assert!(err.reason.contains("robot"));
    }

    #[test]
    fn a_bad_nested_field_is_reported_with_its_path() {
        let err = message(
            r#"{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "tool_calls[0].function.arguments");
    }

    #[test]
    fn image_parts_are_rejected_by_name() {
        let err =
            message(r#"{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}"#)
                .unwrap_err();
        assert_eq!(err.field, "content[0].type");
    }

    #[test]
    fn tools_keep_the_function_object_in_input_order() {
        let t: Tool = serde_json::from_str(
            r#"{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}"#,
        )
        .unwrap();
        assert_eq!(t.name(), "f");
        assert_eq!(
            t.function.to_python_json(),
            r#"{"name": "f", "description": "d", "parameters": {}}"#
        );
    }

    #[test]
    fn parsed_tool_calls_serialize_in_openai_shape() {
        let call = ToolCall {
            id: Some("call_1".into()),
            name: "f".into(),
            arguments: "{}".into(),
        };
        assert_eq!(
            serde_json::to_value(&call).unwrap(),
            serde_json::json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}})
        );
    }
}
