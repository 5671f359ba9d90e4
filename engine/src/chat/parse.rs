//! Completion parsing for DeepSeek-V3.2: model output to reasoning, content and tool calls.
//!
//! Ports the grammar of DeepSeek's `parse_message_from_completion_text`: reasoning up to
//! `</think>` (thinking mode), content up to EOS or `\n\n<｜DSML｜function_calls`, then DSML
//! invokes whose parameters become an OpenAI `arguments` JSON string (`string="true"`
//! values quoted, others verbatim). Unlike the reference it never fails: text that breaks
//! the grammar is passed through as content.
//!
//! [`StreamParser`] is the only implementation; [`parse_completion`] runs it over the
//! whole text, so streamed deltas always add up to the non-streaming result. The parser
//! holds back only text that could still turn into a tag, plus the DSML block until each
//! unit (invoke header, parameter) is complete.

use super::json::json_string;
use super::tokens::{DSML, EOS, THINK_END};
use super::types::{ThinkingMode, ToolCall};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A parsed assistant completion, in OpenAI's message shape.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct ParsedMessage {
    /// The thinking text; `None` in chat mode.
    pub reasoning_content: Option<String>,
    /// The answer text (everything that is not reasoning or a well-formed tool call).
    pub content: String,
    /// Calls with generated `call_…` ids and `arguments` as JSON text.
    pub tool_calls: Vec<ToolCall>,
}

/// One streamed piece of a completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    ReasoningDelta(String),
    ContentDelta(String),
    /// A tool call begins; its arguments follow as fragments with the same index.
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// The next piece of the call's `arguments` JSON text.
    ToolCallArgumentsDelta {
        index: usize,
        json_fragment: String,
    },
}

/// Parses a complete completion. Never fails.
pub fn parse_completion(text: &str, mode: ThinkingMode) -> ParsedMessage {
    let mut parser = StreamParser::new(mode);
    let mut deltas = parser.push(text);
    deltas.extend(parser.finish());
    collect(mode, deltas)
}

/// Folds deltas into a message, as a client assembling a stream would.
pub fn collect(mode: ThinkingMode, deltas: impl IntoIterator<Item = Delta>) -> ParsedMessage {
    let mut msg = ParsedMessage {
        reasoning_content: (mode == ThinkingMode::Thinking).then(String::new),
        ..ParsedMessage::default()
    };
    for delta in deltas {
        match delta {
            Delta::ReasoningDelta(text) => msg
                .reasoning_content
                .get_or_insert_with(String::new)
                .push_str(&text),
            Delta::ContentDelta(text) => msg.content.push_str(&text),
            Delta::ToolCallStart { id, name, .. } => msg.tool_calls.push(ToolCall {
                id: Some(id),
                name,
                arguments: String::new(),
            }),
            Delta::ToolCallArgumentsDelta {
                index,
                json_fragment,
            } => {
                if let Some(call) = msg.tool_calls.get_mut(index) {
                    call.arguments.push_str(&json_fragment);
                }
            }
        }
    }
    msg
}

/// Where the parser is in the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reasoning,
    Content,
    /// Expecting `>\n` right after `\n\n<｜DSML｜function_calls`.
    BlockOpen,
    /// Expecting an invoke header or the end of the block.
    BetweenInvokes,
    /// Inside an invoke that has emitted `params` parameters so far.
    InInvoke {
        params: usize,
    },
    /// After `</｜DSML｜function_calls>`: only EOS is expected; anything else is content.
    AfterBlock,
    /// The DSML block broke the grammar: the rest is content up to EOS.
    Raw,
    /// EOS seen: the rest is ignored.
    Stopped,
}

/// An incremental parser over text deltas; see the module docs.
#[derive(Debug)]
pub struct StreamParser {
    phase: Phase,
    /// Text received but not yet emitted; in the DSML phases it starts at a unit boundary.
    buf: String,
    /// The consumed block opener, given back as content if the block breaks before its
    /// first invoke.
    opener: String,
    /// Index of the next tool call.
    next_call: usize,
}

/// Outcome of matching a literal at the start of the buffer.
enum Lit {
    Full,
    /// The buffer is a proper prefix of the literal: wait for more text.
    Partial,
    No,
}

fn match_lit(buf: &str, lit: &str) -> Lit {
    if buf.starts_with(lit) {
        Lit::Full
    } else if lit.starts_with(buf) {
        Lit::Partial
    } else {
        Lit::No
    }
}

/// Result of one parsing step in the DSML phases.
enum Step {
    Progress,
    Wait,
    Malformed,
}

impl StreamParser {
    pub fn new(mode: ThinkingMode) -> StreamParser {
        let phase = match mode {
            ThinkingMode::Thinking => Phase::Reasoning,
            ThinkingMode::Chat => Phase::Content,
        };
        StreamParser {
            phase,
            buf: String::new(),
            opener: String::new(),
            next_call: 0,
        }
    }

    /// Feeds the next piece of generated text; returns what is now certain.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let mut out = Vec::new();
        if self.phase == Phase::Stopped {
            return out;
        }
        self.buf.push_str(text);
        while self.step(&mut out) {}
        out
    }

    /// Ends the stream: whatever was held back is emitted as it stands.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match self.phase {
            Phase::Reasoning => push_text(&mut out, Delta::ReasoningDelta, rest),
            Phase::Content | Phase::AfterBlock | Phase::Raw => {
                push_text(&mut out, Delta::ContentDelta, rest)
            }
            Phase::BlockOpen | Phase::BetweenInvokes | Phase::InInvoke { .. } => {
                self.close_invoke(&mut out);
                let opener = std::mem::take(&mut self.opener);
                push_text(&mut out, Delta::ContentDelta, opener + &rest);
            }
            Phase::Stopped => {}
        }
        self.phase = Phase::Stopped;
        out
    }

    /// Makes one move; false when more text is needed.
    fn step(&mut self, out: &mut Vec<Delta>) -> bool {
        let tool_start = format!("\n\n<{DSML}function_calls");
        match self.phase {
            Phase::Reasoning => self.scan_text(out, Delta::ReasoningDelta, &[THINK_END, EOS]),
            Phase::Content => self.scan_text(out, Delta::ContentDelta, &[EOS, tool_start.as_str()]),
            Phase::AfterBlock | Phase::Raw => self.scan_text(out, Delta::ContentDelta, &[EOS]),
            Phase::Stopped => false,
            Phase::BlockOpen | Phase::BetweenInvokes | Phase::InInvoke { .. } => {
                match self.step_dsml(out) {
                    Step::Progress => true,
                    Step::Wait => false,
                    Step::Malformed => {
                        self.close_invoke(out);
                        self.buf.insert_str(0, &std::mem::take(&mut self.opener));
                        self.phase = Phase::Raw;
                        true
                    }
                }
            }
        }
    }

    /// Emits text up to the first stop string, holding back a possible partial stop.
    fn scan_text(
        &mut self,
        out: &mut Vec<Delta>,
        wrap: fn(String) -> Delta,
        stops: &[&str],
    ) -> bool {
        let hit = stops
            .iter()
            .filter_map(|stop| self.buf.find(stop).map(|pos| (pos, *stop)))
            .min_by_key(|(pos, _)| *pos);
        let Some((pos, stop)) = hit else {
            let keep = stops
                .iter()
                .map(|s| partial_suffix(&self.buf, s))
                .max()
                .unwrap_or(0);
            let emit: String = self.buf.drain(..self.buf.len() - keep).collect();
            push_text(out, wrap, emit);
            return false;
        };
        let before: String = self.buf.drain(..pos).collect();
        push_text(out, wrap, before);
        if stop == EOS {
            self.buf.clear();
            self.phase = Phase::Stopped;
        } else if stop == THINK_END {
            self.buf.drain(..stop.len());
            self.phase = Phase::Content;
        } else {
            self.phase = Phase::BlockOpen;
        }
        true
    }

    fn step_dsml(&mut self, out: &mut Vec<Delta>) -> Step {
        match self.phase {
            Phase::BlockOpen => {
                let open = format!("\n\n<{DSML}function_calls>\n");
                match match_lit(&self.buf, &open) {
                    Lit::Full => {
                        self.opener = self.buf.drain(..open.len()).collect();
                        self.phase = Phase::BetweenInvokes;
                        Step::Progress
                    }
                    Lit::Partial => Step::Wait,
                    Lit::No => Step::Malformed,
                }
            }
            Phase::BetweenInvokes => {
                let end = format!("</{DSML}function_calls>");
                match match_lit(&self.buf, &end) {
                    Lit::Full => {
                        self.buf.drain(..end.len());
                        self.opener.clear();
                        self.phase = Phase::AfterBlock;
                        return Step::Progress;
                    }
                    Lit::Partial => return Step::Wait,
                    Lit::No => {}
                }
                self.step_invoke_header(out)
            }
            Phase::InInvoke { params } => {
                let close = format!("</{DSML}invoke>\n");
                let close_empty = format!("\n{close}");
                for (lit, allowed) in [(&close, true), (&close_empty, params == 0)] {
                    if !allowed {
                        continue;
                    }
                    match match_lit(&self.buf, lit) {
                        Lit::Full => {
                            self.buf.drain(..lit.len());
                            self.close_invoke(out);
                            self.phase = Phase::BetweenInvokes;
                            return Step::Progress;
                        }
                        Lit::Partial => return Step::Wait,
                        Lit::No => {}
                    }
                }
                self.step_parameter(out, params)
            }
            _ => Step::Wait,
        }
    }

    /// `<｜DSML｜invoke name="NAME">\n`
    fn step_invoke_header(&mut self, out: &mut Vec<Delta>) -> Step {
        let open = format!("<{DSML}invoke");
        match match_lit(&self.buf, &open) {
            Lit::Full => {}
            Lit::Partial => return Step::Wait,
            Lit::No => return Step::Malformed,
        }
        let Some(end) = self.buf.find("\">\n") else {
            return Step::Wait;
        };
        let header = &self.buf[open.len()..end];
        let Some(name) = header.trim_start().strip_prefix("name=\"") else {
            return Step::Malformed;
        };
        if header.contains(DSML) {
            return Step::Malformed;
        }
        let name = name.to_owned();
        self.buf.drain(..end + 3);
        let index = self.next_call;
        self.opener.clear();
        out.push(Delta::ToolCallStart {
            index,
            id: new_call_id(),
            name,
        });
        self.phase = Phase::InInvoke { params: 0 };
        Step::Progress
    }

    /// `<｜DSML｜parameter name="K" string="true|false">VALUE</｜DSML｜parameter>\n`
    fn step_parameter(&mut self, out: &mut Vec<Delta>, params: usize) -> Step {
        let open = format!("<{DSML}parameter name=\"");
        match match_lit(&self.buf, &open) {
            Lit::Full => {}
            Lit::Partial => return Step::Wait,
            Lit::No => return Step::Malformed,
        }
        let close = format!("/{DSML}parameter");
        let Some(close_at) = self.buf.find(&close) else {
            return Step::Wait;
        };
        let after = close_at + close.len();
        match match_lit(&self.buf[after..], ">\n") {
            Lit::Full => {}
            Lit::Partial => return Step::Wait,
            Lit::No => return Step::Malformed,
        }
        let Some(body) = self.buf[open.len()..close_at].strip_suffix('<') else {
            return Step::Malformed;
        };
        let Some((key, rest)) = body.split_once("\" string=\"") else {
            return Step::Malformed;
        };
        let (is_string, value) = if let Some(v) = rest.strip_prefix("true\">") {
            (true, v)
        } else if let Some(v) = rest.strip_prefix("false\">") {
            (false, v)
        } else {
            return Step::Malformed;
        };
        let value_json = if is_string || serde_json::from_str::<serde_json::Value>(value).is_err() {
            json_string(value)
        } else {
            value.to_owned()
        };
        let sep = if params == 0 { "{" } else { ", " };
        let json_fragment = format!("{sep}{}: {value_json}", json_string(key));
        self.buf.drain(..after + 2);
        out.push(Delta::ToolCallArgumentsDelta {
            index: self.next_call,
            json_fragment,
        });
        self.phase = Phase::InInvoke { params: params + 1 };
        Step::Progress
    }

    /// Completes the arguments of the open invoke, if any, so they stay valid JSON.
    fn close_invoke(&mut self, out: &mut Vec<Delta>) {
        if let Phase::InInvoke { params } = self.phase {
            let json_fragment = if params == 0 { "{}" } else { "}" }.to_owned();
            out.push(Delta::ToolCallArgumentsDelta {
                index: self.next_call,
                json_fragment,
            });
            self.next_call += 1;
        }
    }
}

fn push_text(out: &mut Vec<Delta>, wrap: fn(String) -> Delta, text: String) {
    if !text.is_empty() {
        out.push(wrap(text));
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// `call_` + 24 hex digits, unique within the process and random across processes.
pub fn new_call_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(n);
    let high = hasher.finish();
    format!("call_{high:016x}{:08x}", n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLS: &str = "Let me check.\n\n<｜DSML｜function_calls>\n\
        <｜DSML｜invoke name=\"get_weather\">\n\
        <｜DSML｜parameter name=\"location\" string=\"true\">杭州 \"West\"</｜DSML｜parameter>\n\
        <｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n\
        </｜DSML｜invoke>\n\
        <｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n\
        </｜DSML｜function_calls><｜end▁of▁sentence｜>";

    #[test]
    fn thinking_output_splits_into_reasoning_and_content() {
        let parsed = parse_completion(
            "hmm</think>Hello<｜end▁of▁sentence｜>ignored",
            ThinkingMode::Thinking,
        );
        assert_eq!(parsed.reasoning_content.as_deref(), Some("hmm"));
        assert_eq!(parsed.content, "Hello");
        assert!(parsed.tool_calls.is_empty());
    }

    #[test]
    fn chat_output_has_no_reasoning() {
        let parsed = parse_completion("Hello", ThinkingMode::Chat);
        assert_eq!(parsed.reasoning_content, None);
        assert_eq!(parsed.content, "Hello");
    }

    #[test]
    fn dsml_invokes_become_openai_tool_calls() {
        let parsed = parse_completion(CALLS, ThinkingMode::Chat);
        assert_eq!(parsed.content, "Let me check.");
        assert_eq!(parsed.tool_calls.len(), 2);
        assert_eq!(parsed.tool_calls[0].name, "get_weather");
        assert_eq!(
            parsed.tool_calls[0].arguments,
            r#"{"location": "杭州 \"West\"", "days": 3}"#
        );
        assert_eq!(parsed.tool_calls[1].name, "now");
        assert_eq!(parsed.tool_calls[1].arguments, "{}");
        assert_ne!(parsed.tool_calls[0].id, parsed.tool_calls[1].id);
    }

    #[test]
    fn a_non_json_value_marked_string_false_is_quoted() {
        let text = "\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n\
            <｜DSML｜parameter name=\"x\" string=\"false\">not json</｜DSML｜parameter>\n\
            </｜DSML｜invoke>\n</｜DSML｜function_calls>";
        let parsed = parse_completion(text, ThinkingMode::Chat);
        assert_eq!(parsed.tool_calls[0].arguments, r#"{"x": "not json"}"#);
    }

    #[test]
    fn a_malformed_block_degrades_to_content() {
        let text = "Hi\n\n<｜DSML｜function_calls>\n<｜DSML｜oops>";
        let parsed = parse_completion(text, ThinkingMode::Chat);
        assert_eq!(parsed.content, text);
        assert!(parsed.tool_calls.is_empty());
    }

    #[test]
    fn a_block_broken_inside_an_invoke_keeps_valid_arguments() {
        let text = "\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n\
            <｜DSML｜parameter name=\"a\" string=\"true\">1</｜DSML｜parameter>\nBROKEN";
        let parsed = parse_completion(text, ThinkingMode::Chat);
        assert_eq!(parsed.tool_calls[0].arguments, r#"{"a": "1"}"#);
        assert_eq!(parsed.content, "BROKEN");
    }

    #[test]
    fn output_cut_off_mid_tag_is_kept_as_text() {
        let parsed = parse_completion("partial</thi", ThinkingMode::Thinking);
        assert_eq!(parsed.reasoning_content.as_deref(), Some("partial</thi"));
        let parsed = parse_completion("answer\n\n<｜DSML｜func", ThinkingMode::Chat);
        assert_eq!(parsed.content, "answer\n\n<｜DSML｜func");
    }

    #[test]
    fn streaming_holds_back_only_a_possible_tag_prefix() {
        let mut parser = StreamParser::new(ThinkingMode::Thinking);
        assert_eq!(
            parser.push("abc</th"),
            vec![Delta::ReasoningDelta("abc".into())]
        );
        assert_eq!(
            parser.push("ink>x\n"),
            vec![Delta::ContentDelta("x".into())]
        );
        assert_eq!(parser.push("y"), vec![Delta::ContentDelta("\ny".into())]);
    }

    #[test]
    fn streamed_tool_calls_start_before_their_arguments() {
        let mut parser = StreamParser::new(ThinkingMode::Chat);
        let mut deltas = parser.push(CALLS);
        deltas.extend(parser.finish());
        assert!(
            matches!(&deltas[1], Delta::ToolCallStart { index: 0, name, .. } if name == "get_weather")
        );
        assert!(matches!(
            &deltas[2],
            Delta::ToolCallArgumentsDelta { index: 0, .. }
        ));
    }

    /// SplitMix64: a small deterministic generator for chunk boundaries.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Splits `text` at random char boundaries, chunks of 1 to `max` chars.
    fn chunks<'a>(text: &'a str, rng: &mut Rng, max: u64) -> Vec<&'a str> {
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut out = Vec::new();
        let mut at = 0;
        while at + 1 < bounds.len() {
            let step = 1 + (rng.next() % max) as usize;
            let next = (at + step).min(bounds.len() - 1);
            out.push(&text[bounds[at]..bounds[next]]);
            at = next;
        }
        out
    }

    fn without_ids(mut msg: ParsedMessage) -> ParsedMessage {
        for call in &mut msg.tool_calls {
            call.id = None;
        }
        msg
    }

    #[test]
    fn any_chunking_of_the_stream_adds_up_to_the_whole_parse() {
        let samples = [
            (CALLS, ThinkingMode::Chat),
            (
                &format!("reason</think>{CALLS}")[..],
                ThinkingMode::Thinking,
            ),
            (
                "a</think>b\n\nc\n\n<｜DSML｜function_callsX<｜end▁of▁sentence｜>",
                ThinkingMode::Thinking,
            ),
            (
                "a\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"k\" str",
                ThinkingMode::Chat,
            ),
            (
                "</think></think><｜end▁of▁sentence｜",
                ThinkingMode::Thinking,
            ),
            ("no tags at all, 中文 and emoji 📅\n\n", ThinkingMode::Chat),
            (
                &CALLS.replace("</｜DSML｜invoke>\n<", "</｜DSML｜invoke>\nX<")[..],
                ThinkingMode::Chat,
            ),
        ];
        let mut rng = Rng(7);
        for (text, mode) in samples {
            let whole = without_ids(parse_completion(text, mode));
            for round in 0..300 {
                let mut parser = StreamParser::new(mode);
                let mut deltas = Vec::new();
                for chunk in chunks(text, &mut rng, 1 + round % 12) {
                    deltas.extend(parser.push(chunk));
                }
                deltas.extend(parser.finish());
                assert_eq!(
                    without_ids(collect(mode, deltas)),
                    whole,
                    "text {text:?} round {round}"
                );
            }
        }
    }
}
