//! Prompt encoding for DeepSeek-V3.2: messages (+ tools) to the prompt text.
//!
//! Reproduces DeepSeek's `encoding_dsv32.py` (`encode_messages`) byte for byte; the
//! literal strings below are the ones the model was trained on. Pure functions: no I/O.
//!
//! Rules, per turn:
//! - system: content, then the tools block and the response-format block when present;
//! - user: `<｜User｜>{content}<｜Assistant｜>`, then `<think>` when it is the last user
//!   turn in thinking mode, else `</think>`;
//! - developer: a user turn whose body is tools, response format and the task;
//! - assistant: reasoning + `</think>` (thinking mode, after the last user turn only, so
//!   earlier reasoning is always dropped), content, a DSML `function_calls` block, EOS;
//! - tool: results of the preceding assistant's calls in order, wrapped in
//!   `<function_results>`; after the last one the think block reopens (or closes).

use super::json::Json;
use super::types::{FieldError, Message, Role, ThinkingMode, Tool};
use super::{ChatError, tokens};

/// How a conversation is turned into a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeOptions {
    /// Emit BOS at the start (only when nothing is treated as context).
    pub add_bos_token: bool,
    /// The first `context_len` messages are history already in the KV cache: they shape
    /// the rendering of later turns but are not emitted.
    pub context_len: usize,
    /// A request-level response format, rendered into the leading system turn.
    pub response_format: Option<Json>,
}

impl Default for EncodeOptions {
    fn default() -> EncodeOptions {
        EncodeOptions {
            add_bos_token: true,
            context_len: 0,
            response_format: None,
        }
    }
}

/// The fixed tools preamble; the JSON schemas and `</functions>\n` follow it.
const TOOLS_PREAMBLE: &str = r#"## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<｜DSML｜function_calls>" block like the following as part of your reply to the user:
<｜DSML｜function_calls>
<｜DSML｜invoke name="$FUNCTION_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$FUNCTION_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<｜DSML｜function_calls>
...
</｜DSML｜function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
"#;

const RESPONSE_FORMAT_PREAMBLE: &str =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

const DEVELOPER_TASK_PREFIX: &str = "\n\n# The user's message is: ";

/// Renders `messages` into a DeepSeek-V3.2 prompt.
///
/// `tools` are request-level tools (OpenAI's top-level `tools`): they join the leading
/// system message when it declares none of its own, otherwise they get an empty system
/// turn of their own at the start. `opts.response_format` is placed the same way.
pub fn encode_messages(
    messages: &[Message],
    tools: Option<&[Tool]>,
    mode: ThinkingMode,
    opts: &EncodeOptions,
) -> Result<String, ChatError> {
    if opts.context_len > messages.len() {
        return Err(ChatError::InvalidRequest {
            field: "context_len".into(),
            reason: format!(
                "{} exceeds the {} messages",
                opts.context_len,
                messages.len()
            ),
        });
    }
    let extra = Lowered {
        tools: tools.unwrap_or_default(),
        response_format: opts.response_format.as_ref().filter(|rf| rf.is_truthy()),
    };
    let attach_to_first = messages
        .first()
        .is_some_and(|m| m.role == Role::System && m.tools.is_empty() && !has_format(m));
    let convo = Conversation {
        messages,
        mode,
        last_user: messages
            .iter()
            .rposition(|m| matches!(m.role, Role::User | Role::Developer)),
        first_extra: if attach_to_first {
            extra
        } else {
            Lowered::NONE
        },
    };

    let mut prompt = String::new();
    if opts.context_len == 0 {
        if opts.add_bos_token {
            prompt.push_str(tokens::BOS);
        }
        if !attach_to_first && !extra.is_empty() {
            render_system(&mut prompt, "", extra.tools, extra.response_format);
        }
    }
    let mut discarded = String::new();
    for index in 0..messages.len() {
        let out = if index < opts.context_len {
            &mut discarded
        } else {
            &mut prompt
        };
        convo
            .render(index, out)
            .map_err(|e| ChatError::InvalidMessage {
                index,
                field: e.field,
                reason: e.reason,
            })?;
        discarded.clear();
    }
    Ok(prompt)
}

fn has_format(m: &Message) -> bool {
    m.response_format.as_ref().is_some_and(Json::is_truthy)
}

/// Request-level tools and response format lowered into a system turn.
#[derive(Clone, Copy)]
struct Lowered<'a> {
    tools: &'a [Tool],
    response_format: Option<&'a Json>,
}

impl Lowered<'_> {
    const NONE: Lowered<'static> = Lowered {
        tools: &[],
        response_format: None,
    };

    fn is_empty(&self) -> bool {
        self.tools.is_empty() && self.response_format.is_none()
    }
}

struct Conversation<'a> {
    messages: &'a [Message],
    mode: ThinkingMode,
    last_user: Option<usize>,
    /// What the first (system) message carries besides its own fields.
    first_extra: Lowered<'a>,
}

impl Conversation<'_> {
    fn thinking(&self) -> bool {
        self.mode == ThinkingMode::Thinking
    }

    fn after_last_user(&self, index: usize) -> bool {
        self.last_user.is_none_or(|u| index > u)
    }

    fn render(&self, index: usize, out: &mut String) -> Result<(), FieldError> {
        let msg = &self.messages[index];
        let content = msg.content.as_deref().unwrap_or_default();
        let response_format = msg.response_format.as_ref().filter(|rf| rf.is_truthy());
        match msg.role {
            Role::System => {
                let (tools, rf) = if index == 0 && !self.first_extra.is_empty() {
                    (self.first_extra.tools, self.first_extra.response_format)
                } else {
                    (msg.tools.as_slice(), response_format)
                };
                render_system(out, content, tools, rf);
            }
            Role::User => {
                self.render_user_turn(index, content, out);
            }
            Role::Developer => {
                if content.is_empty() {
                    return Err(FieldError::new(
                        "content",
                        "a developer message needs content",
                    ));
                }
                let mut body = String::new();
                if !msg.tools.is_empty() {
                    body.push_str("\n\n");
                    render_tools(&mut body, &msg.tools);
                }
                if let Some(rf) = response_format {
                    body.push_str("\n\n");
                    render_response_format(&mut body, rf);
                }
                body.push_str(DEVELOPER_TASK_PREFIX);
                body.push_str(content);
                self.render_user_turn(index, &body, out);
            }
            Role::Assistant => self.render_assistant(index, msg, content, out)?,
            Role::Tool => self.render_tool_result(index, content, out)?,
        }
        Ok(())
    }

    fn render_user_turn(&self, index: usize, body: &str, out: &mut String) {
        out.push_str(tokens::USER);
        out.push_str(body);
        out.push_str(tokens::ASSISTANT);
        let opens_thinking = self.thinking() && self.last_user == Some(index);
        out.push_str(if opens_thinking {
            tokens::THINK_START
        } else {
            tokens::THINK_END
        });
    }

    fn render_assistant(
        &self,
        index: usize,
        msg: &Message,
        content: &str,
        out: &mut String,
    ) -> Result<(), FieldError> {
        let reasoning = msg.reasoning_content.as_deref().unwrap_or_default();
        if self.thinking() && self.after_last_user(index) {
            if reasoning.is_empty() && msg.tool_calls.is_empty() {
                return Err(FieldError::new(
                    "reasoning_content",
                    "in thinking mode an assistant turn after the last user turn needs \
                     reasoning_content or tool_calls",
                ));
            }
            out.push_str(reasoning);
            out.push_str(tokens::THINK_END);
        }
        out.push_str(content);
        if !msg.tool_calls.is_empty() {
            out.push_str("\n\n<");
            out.push_str(tokens::DSML);
            out.push_str("function_calls>\n");
            for (i, call) in msg.tool_calls.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                render_invoke(out, &call.name, &call.arguments).map_err(|reason| {
                    FieldError::new(&format!("tool_calls[{i}].function.arguments"), reason)
                })?;
            }
            out.push_str("\n</");
            out.push_str(tokens::DSML);
            out.push_str("function_calls>");
        }
        out.push_str(tokens::EOS);
        Ok(())
    }

    fn render_tool_result(
        &self,
        index: usize,
        content: &str,
        out: &mut String,
    ) -> Result<(), FieldError> {
        let caller = self.messages[..index]
            .iter()
            .rposition(|m| m.role != Role::Tool);
        let Some(caller) = caller.filter(|&c| self.messages[c].role == Role::Assistant) else {
            return Err(FieldError::new(
                "role",
                "a tool message must follow an assistant message with tool_calls",
            ));
        };
        let calls = self.messages[caller].tool_calls.len();
        let order = index - caller;
        if order > calls {
            return Err(FieldError::new(
                "tool_call_id",
                format!(
                    "tool result {order} follows messages[{caller}], which made {calls} tool call(s)"
                ),
            ));
        }
        if order == 1 {
            out.push_str("\n\n<function_results>");
        }
        out.push_str("\n<result>");
        out.push_str(content);
        out.push_str("</result>");
        if order == calls {
            out.push_str("\n</function_results>\n\n");
            let reopen = self.thinking() && self.after_last_user(index);
            out.push_str(if reopen {
                tokens::THINK_START
            } else {
                tokens::THINK_END
            });
        }
        Ok(())
    }
}

fn render_system(out: &mut String, content: &str, tools: &[Tool], response_format: Option<&Json>) {
    out.push_str(content);
    if !tools.is_empty() {
        out.push_str("\n\n");
        render_tools(out, tools);
    }
    if let Some(rf) = response_format {
        out.push_str("\n\n");
        render_response_format(out, rf);
    }
}

fn render_tools(out: &mut String, tools: &[Tool]) {
    out.push_str(TOOLS_PREAMBLE);
    for (i, tool) in tools.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&tool.function.to_python_json());
    }
    out.push_str("\n</functions>\n");
}

fn render_response_format(out: &mut String, response_format: &Json) {
    out.push_str(RESPONSE_FORMAT_PREAMBLE);
    out.push_str(&response_format.to_python_json());
}

/// One `<｜DSML｜invoke>`: string values raw, everything else as JSON.
fn render_invoke(out: &mut String, name: &str, arguments: &str) -> Result<(), String> {
    let entries = if arguments.trim().is_empty() {
        Vec::new()
    } else {
        match Json::parse(arguments) {
            Ok(Json::Object(entries)) => entries,
            Ok(other) => return Err(format!("expected a JSON object, found {}", other.kind())),
            Err(e) => return Err(format!("not valid JSON: {e}")),
        }
    };
    let dsml = tokens::DSML;
    out.push_str(&format!("<{dsml}invoke name=\"{name}\">\n"));
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let (is_str, text) = match value {
            Json::String(s) => ("true", s.clone()),
            other => ("false", other.to_python_json()),
        };
        out.push_str(&format!(
            "<{dsml}parameter name=\"{key}\" string=\"{is_str}\">{text}</{dsml}parameter>"
        ));
    }
    out.push_str(&format!("\n</{dsml}invoke>"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::parse::parse_completion;

    const INPUT: &str = include_str!("../../tests/data/chat/test_input.json");
    const OUTPUT: &str = include_str!("../../tests/data/chat/test_output.txt");
    const SEARCH_WO_DATE_INPUT: &str =
        include_str!("../../tests/data/chat/test_input_search_wo_date.json");
    const SEARCH_WO_DATE_OUTPUT: &str =
        include_str!("../../tests/data/chat/test_output_search_wo_date.txt");
    const SEARCH_W_DATE_INPUT: &str =
        include_str!("../../tests/data/chat/test_input_search_w_date.json");
    const SEARCH_W_DATE_OUTPUT: &str =
        include_str!("../../tests/data/chat/test_output_search_w_date.txt");

    /// Messages and top-level tools of a gold input file.
    fn load(input: &str) -> (Vec<Message>, Vec<Tool>) {
        #[derive(serde::Deserialize)]
        struct Input {
            messages: Vec<Message>,
            #[serde(default)]
            tools: Vec<Tool>,
        }
        let parsed: Input = serde_json::from_str(input).unwrap();
        (parsed.messages, parsed.tools)
    }

    fn thinking(messages: &[Message], tools: &[Tool]) -> String {
        encode_messages(
            messages,
            Some(tools),
            ThinkingMode::Thinking,
            &EncodeOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn weather_conversation_matches_deepseek_gold_output() {
        let (messages, tools) = load(INPUT);
        assert_eq!(thinking(&messages, &tools), OUTPUT.trim());
    }

    #[test]
    fn tools_declared_on_the_system_message_render_the_same_as_top_level_tools() {
        let (mut messages, tools) = load(INPUT);
        messages[0].tools = tools;
        assert_eq!(thinking(&messages, &[]), OUTPUT.trim());
    }

    #[test]
    fn developer_search_conversation_matches_deepseek_gold_output() {
        let (messages, tools) = load(SEARCH_WO_DATE_INPUT);
        assert_eq!(thinking(&messages, &tools), SEARCH_WO_DATE_OUTPUT.trim());
    }

    #[test]
    fn developer_search_with_date_reminder_matches_deepseek_gold_output() {
        let (messages, tools) = load(SEARCH_W_DATE_INPUT);
        assert_eq!(thinking(&messages, &tools), SEARCH_W_DATE_OUTPUT.trim());
    }

    /// Encodes `messages[at]` with the earlier messages as context, as DeepSeek's test does.
    fn encode_one(messages: &[Message], at: usize) -> String {
        let opts = EncodeOptions {
            context_len: at,
            ..EncodeOptions::default()
        };
        encode_messages(&messages[..=at], None, ThinkingMode::Thinking, &opts).unwrap()
    }

    #[test]
    fn a_tool_call_message_round_trips_through_the_parser() {
        let (messages, _) = load(INPUT);
        let original = &messages[4];
        let parsed = parse_completion(&encode_one(&messages, 4), ThinkingMode::Thinking);
        assert_eq!(parsed.reasoning_content, original.reasoning_content);
        assert_eq!(parsed.tool_calls.len(), original.tool_calls.len());
        for (got, want) in parsed.tool_calls.iter().zip(&original.tool_calls) {
            assert_eq!((&got.name, &got.arguments), (&want.name, &want.arguments));
            assert!(got.id.as_deref().is_some_and(|id| id.starts_with("call_")));
        }
    }

    #[test]
    fn a_thinking_message_round_trips_through_the_parser() {
        let (messages, _) = load(INPUT);
        let at = messages.len() - 6;
        let original = &messages[at];
        let parsed = parse_completion(&encode_one(&messages, at), ThinkingMode::Thinking);
        assert_eq!(parsed.reasoning_content, original.reasoning_content);
        assert_eq!(Some(parsed.content.as_str()), original.content.as_deref());
        assert!(parsed.tool_calls.is_empty());
    }

    fn user(text: &str) -> Message {
        Message::new(Role::User, text)
    }

    fn assistant(reasoning: &str, text: &str) -> Message {
        Message {
            reasoning_content: Some(reasoning.into()),
            ..Message::new(Role::Assistant, text)
        }
    }

    fn encode(messages: &[Message], mode: ThinkingMode) -> Result<String, ChatError> {
        encode_messages(messages, None, mode, &EncodeOptions::default())
    }

    #[test]
    fn chat_mode_closes_the_think_block_after_every_user_turn() {
        let prompt = encode(&[user("hi")], ThinkingMode::Chat).unwrap();
        assert_eq!(
            prompt,
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>"
        );
    }

    #[test]
    fn thinking_mode_opens_the_think_block_after_the_last_user_turn_only() {
        let prompt = encode(
            &[user("a"), assistant("r", "b"), user("c")],
            ThinkingMode::Thinking,
        )
        .unwrap();
        assert_eq!(
            prompt,
            "<｜begin▁of▁sentence｜><｜User｜>a<｜Assistant｜></think>b<｜end▁of▁sentence｜>\
             <｜User｜>c<｜Assistant｜><think>"
        );
    }

    #[test]
    fn reasoning_before_the_last_user_turn_is_dropped() {
        let prompt = encode(
            &[user("a"), assistant("secret", "b"), user("c")],
            ThinkingMode::Thinking,
        )
        .unwrap();
        assert!(!prompt.contains("secret"));
    }

    #[test]
    fn response_format_is_appended_to_the_system_prompt() {
        let mut system = Message::new(Role::System, "S");
        system.response_format = Some(Json::parse(r#"{"type": "json_object"}"#).unwrap());
        let prompt = encode(&[system, user("u")], ThinkingMode::Chat).unwrap();
        assert!(prompt.starts_with(
            "<｜begin▁of▁sentence｜>S\n\n## Response Format:\n\nYou MUST strictly adhere to the \
             following schema to reply:\n{\"type\": \"json_object\"}<｜User｜>"
        ));
    }

    #[test]
    fn top_level_tools_without_a_system_message_get_an_empty_system_turn() {
        let tool: Tool =
            serde_json::from_str(r#"{"type": "function", "function": {"name": "f"}}"#).unwrap();
        let prompt = encode_messages(
            &[user("u")],
            Some(&[tool]),
            ThinkingMode::Chat,
            &EncodeOptions::default(),
        )
        .unwrap();
        assert!(prompt.starts_with("<｜begin▁of▁sentence｜>\n\n## Tools\n"));
        assert!(prompt.contains("<functions>\n{\"name\": \"f\"}\n</functions>\n<｜User｜>u"));
    }

    #[test]
    fn non_string_arguments_render_as_json_with_string_false() {
        let mut call = assistant("", "");
        call.tool_calls.push(crate::chat::ToolCall {
            id: None,
            name: "f".into(),
            arguments: r#"{"n": 3, "tags": ["a", "b"], "s": "x y"}"#.into(),
        });
        let prompt = encode(&[user("u"), call], ThinkingMode::Chat).unwrap();
        assert!(prompt.contains(
            "<｜DSML｜invoke name=\"f\">\n\
             <｜DSML｜parameter name=\"n\" string=\"false\">3</｜DSML｜parameter>\n\
             <｜DSML｜parameter name=\"tags\" string=\"false\">[\"a\", \"b\"]</｜DSML｜parameter>\n\
             <｜DSML｜parameter name=\"s\" string=\"true\">x y</｜DSML｜parameter>\n\
             </｜DSML｜invoke>"
        ));
    }

    #[test]
    fn a_tool_message_without_a_preceding_call_names_its_index() {
        let err = encode(
            &[user("u"), Message::new(Role::Tool, "r")],
            ThinkingMode::Chat,
        )
        .unwrap_err();
        assert!(
            matches!(err, ChatError::InvalidMessage { index: 1, ref field, .. } if field == "role")
        );
    }

    #[test]
    fn more_tool_results_than_calls_is_an_error_on_the_extra_result() {
        let mut call = assistant("", "");
        call.tool_calls.push(crate::chat::ToolCall {
            id: None,
            name: "f".into(),
            arguments: "{}".into(),
        });
        let tool = Message::new(Role::Tool, "r");
        let err = encode(&[user("u"), call, tool.clone(), tool], ThinkingMode::Chat).unwrap_err();
        assert!(
            matches!(err, ChatError::InvalidMessage { index: 3, ref field, .. } if field == "tool_call_id")
        );
    }

    #[test]
    fn arguments_that_are_not_a_json_object_name_the_field() {
        let mut call = assistant("", "");
        call.tool_calls.push(crate::chat::ToolCall {
            id: None,
            name: "f".into(),
            arguments: "[1]".into(),
        });
        let err = encode(&[user("u"), call], ThinkingMode::Chat).unwrap_err();
        assert_eq!(err.param(), "messages[1].tool_calls[0].function.arguments");
    }

    #[test]
    fn a_final_assistant_turn_in_thinking_mode_needs_reasoning() {
        let err = encode(
            &[user("u"), Message::new(Role::Assistant, "x")],
            ThinkingMode::Thinking,
        )
        .unwrap_err();
        assert_eq!(err.param(), "messages[1].reasoning_content");
    }

    #[test]
    fn an_empty_developer_message_is_an_error() {
        let err = encode(&[Message::new(Role::Developer, "")], ThinkingMode::Chat).unwrap_err();
        assert_eq!(err.param(), "messages[0].content");
    }
}
