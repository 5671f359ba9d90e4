//! Tokenization: HF `tokenizer.json` through the `tokenizers` crate, DeepSeek special
//! tokens resolved by name, and incremental detokenization for streaming.
//!
//! Owns [`Tokenizer`] (encode without automatic BOS: the chat encoder writes BOS as text),
//! [`DecodeStream`] (the prefix/read-offset scheme of TGI and HF's `DecodeStream`, which
//! never splits a UTF-8 character across chunks, so byte-level and byte-fallback
//! vocabularies stream cleanly), and the built-in byte-level BPE tokenizer of the demo
//! model ([`Tokenizer::builtin`]), which is built as tokenizer.json text and loaded
//! through the same path as a real checkpoint's.

use serde_json::json;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

pub const BOS_TOKEN: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TOKEN: &str = "<｜end▁of▁sentence｜>";
pub const PAD_TOKEN: &str = "<｜▁pad▁｜>";
pub const USER_TOKEN: &str = "<｜User｜>";
pub const ASSISTANT_TOKEN: &str = "<｜Assistant｜>";
pub const THINK_START_TOKEN: &str = "<think>";
pub const THINK_END_TOKEN: &str = "</think>";

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer from {source_name}: {reason}")]
    Load { source_name: String, reason: String },
    #[error("special token {token:?} ({role}) is not in the tokenizer's vocabulary")]
    MissingSpecialToken {
        role: &'static str,
        token: &'static str,
    },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("the text has more than {limit} tokens")]
    TooLong { limit: usize },
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
}

impl TokenizerError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            TokenizerError::Load { .. } => "load",
            TokenizerError::MissingSpecialToken { .. } => "missing_special_token",
            TokenizerError::Encode(_) => "encode",
            TokenizerError::TooLong { .. } => "too_long",
            TokenizerError::Decode(_) => "decode",
            TokenizerError::Write { .. } => "write",
        }
    }
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Ids of the DeepSeek special tokens, looked up by their text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: u32,
    pub eos: u32,
    pub user: u32,
    pub assistant: u32,
    pub think_start: u32,
    pub think_end: u32,
    /// Present in DeepSeek's vocabulary; not needed by the chat format.
    pub pad: Option<u32>,
}

/// A loaded tokenizer; cheap to clone (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    special: SpecialTokens,
    /// Special tokens a reply does not show when skipping them: every added token marked
    /// special except the thinking tags, which the chat parser reads.
    hidden: Arc<HashSet<u32>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            source_name: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Tokenizer::new(inner)
    }

    /// Loads tokenizer.json text.
    pub fn from_json_str(json: &str) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            TokenizerError::Load {
                source_name: "tokenizer.json text".into(),
                reason: e.to_string(),
            }
        })?;
        Tokenizer::new(inner)
    }

    /// The demo model's tokenizer: byte-level BPE, [`BUILTIN_VOCAB_SIZE`] ids, BOS 0, EOS 1.
    pub fn builtin() -> Result<Tokenizer> {
        Tokenizer::from_json_str(&builtin_tokenizer_json())
    }

    fn new(inner: tokenizers::Tokenizer) -> Result<Tokenizer> {
        let id = |role: &'static str, token: &'static str| {
            inner
                .token_to_id(token)
                .ok_or(TokenizerError::MissingSpecialToken { role, token })
        };
        let special = SpecialTokens {
            bos: id("bos", BOS_TOKEN)?,
            eos: id("eos", EOS_TOKEN)?,
            user: id("user", USER_TOKEN)?,
            assistant: id("assistant", ASSISTANT_TOKEN)?,
            think_start: id("think start", THINK_START_TOKEN)?,
            think_end: id("think end", THINK_END_TOKEN)?,
            pad: inner.token_to_id(PAD_TOKEN),
        };
        let hidden = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(id, t)| t.special && **id != special.think_start && **id != special.think_end)
            .map(|(id, _)| *id)
            .collect();
        Ok(Tokenizer {
            inner: Arc::new(inner),
            special,
            hidden: Arc::new(hidden),
        })
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids of `text`. Special-token text (BOS, `<｜User｜>`, ...) maps to its id;
    /// nothing is added, since the prompt already starts with BOS text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` if it has at most `limit` tokens, else [`TokenizerError::TooLong`],
    /// found after encoding little more than `limit` tokens' worth of the text: the cost of
    /// refusing an overlong prompt does not grow with its size.
    pub fn encode_within(&self, text: &str, limit: usize) -> Result<Vec<u32>> {
        // Every token covers at least one byte, so a text of at most `limit` bytes fits.
        if text.len() > limit {
            let mut counted = 0usize;
            let mut splits = 0usize;
            let mut rest = text;
            while !rest.is_empty() {
                let (piece, tail) = split_piece(rest, COUNT_PIECE_BYTES);
                counted = counted.saturating_add(
                    self.inner
                        .encode_fast(piece, false)
                        .map_err(|e| TokenizerError::Encode(e.to_string()))?
                        .len(),
                );
                if counted > limit.saturating_add(splits.saturating_mul(SPLIT_SLACK_TOKENS)) {
                    return Err(TokenizerError::TooLong { limit });
                }
                splits += 1;
                rest = tail;
            }
        }
        let ids = self.encode(text)?;
        if ids.len() > limit {
            return Err(TokenizerError::TooLong { limit });
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// An incremental detokenizer for one generation. Skipping special tokens drops BOS, EOS,
    /// role markers and the like, but keeps `<think>` and `</think>`.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream {
        DecodeStream {
            tokenizer: self.clone(),
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Bytes encoded at a time while counting the tokens of a long text.
const COUNT_PIECE_BYTES: usize = 64 << 10;

/// Tokens one split between pieces may add over encoding the text whole (a word cut in two
/// encodes to at least as many tokens); pieces are cut at whitespace where there is any.
const SPLIT_SLACK_TOKENS: usize = 16;

/// The head of `text` of at most about `max` bytes, cut before a whitespace character in its
/// second half if there is one, else at a character boundary; and the rest.
fn split_piece(text: &str, max: usize) -> (&str, &str) {
    if text.len() <= max {
        return (text, "");
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end == 0 {
        end = text.chars().next().map_or(text.len(), char::len_utf8);
    }
    let cut = match text[..end].rfind(char::is_whitespace) {
        Some(at) if at >= max / 2 => at,
        _ => end,
    };
    text.split_at(cut)
}

/// Turns generated ids into text pieces as soon as they are complete characters.
///
/// Decodes a short window (`ids[prefix_offset..]`) and emits what it adds over
/// `ids[prefix_offset..read_offset]`. A window that ends in U+FFFD is an incomplete UTF-8
/// sequence (a byte token or byte-fallback token on its own) and is held until the next
/// id completes it. Keeping one earlier token in the window preserves decoder context
/// such as SentencePiece's leading-space handling.
#[derive(Debug)]
pub struct DecodeStream {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream {
    /// Adds one id; returns the newly completed text, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        if self.skip_special_tokens && self.tokenizer.hidden.contains(&id) {
            return Ok(None);
        }
        self.ids.push(id);
        self.advance(false)
    }

    /// Emits whatever is still held (an incomplete character shows as U+FFFD).
    pub fn flush(&mut self) -> Result<Option<String>> {
        self.advance(true)
    }

    fn advance(&mut self, force: bool) -> Result<Option<String>> {
        // Hidden ids never enter `ids`; what is there is all shown, thinking tags included.
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, false);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || (!force && full.ends_with('\u{FFFD}')) {
            return Ok(None);
        }
        let new_text = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            None => full.chars().skip(prefix.chars().count()).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(Some(new_text))
    }
}

/// Special tokens of the built-in vocabulary, in id order (DeepSeek's BOS 0 and EOS 1
/// first). `special` marks tokens that `decode(.., skip_special_tokens = true)` drops;
/// the chat tags stay visible because the completion parser reads them.
const BUILTIN_SPECIALS: [(&str, bool); 7] = [
    (BOS_TOKEN, true),
    (EOS_TOKEN, true),
    (PAD_TOKEN, true),
    (USER_TOKEN, false),
    (ASSISTANT_TOKEN, false),
    (THINK_START_TOKEN, false),
    (THINK_END_TOKEN, false),
];

/// Merges of the built-in BPE, in priority order, as plain text pieces.
const BUILTIN_MERGES: &[(&str, &str)] = &[
    ("t", "h"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("r", "e"),
    ("o", "n"),
    (" ", "t"),
    ("e", "n"),
    ("a", "t"),
    ("o", "r"),
    (" ", "a"),
    ("e", "s"),
    (" ", "s"),
    (" ", "w"),
    ("i", "s"),
    ("i", "t"),
    ("a", "l"),
    (" ", "o"),
    (" ", "th"),
    ("th", "e"),
    (" th", "e"),
    (" ", "i"),
    (" ", "c"),
    ("e", "d"),
    ("in", "g"),
    (" ", "b"),
    (" ", "f"),
    (" ", "p"),
    ("o", "u"),
    ("n", "d"),
    (" ", "m"),
    ("l", "e"),
    ("a", "r"),
    (" ", "h"),
    ("an", "d"),
    (" ", "and"),
    (" o", "f"),
];

/// Ids in the built-in tokenizer: specials, then the 256 bytes, then one per merge.
pub const BUILTIN_VOCAB_SIZE: usize = BUILTIN_SPECIALS.len() + 256 + BUILTIN_MERGES.len();
const _: () = assert!(BUILTIN_VOCAB_SIZE <= 512);

/// GPT-2's byte-to-character table used by byte-level BPE: printable bytes stand for
/// themselves, the rest are shifted to U+0100 onwards.
fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn byte_level(text: &str) -> String {
    text.bytes().map(byte_level_char).collect()
}

/// The built-in tokenizer as tokenizer.json text.
pub fn builtin_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (content, special)) in BUILTIN_SPECIALS.iter().enumerate() {
        vocab.insert(content.to_string(), json!(id));
        added.push(json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special,
        }));
    }
    for byte in 0..=255u8 {
        let id = vocab.len();
        vocab.insert(byte_level_char(byte).to_string(), json!(id));
    }
    let mut merges = Vec::new();
    for &(left, right) in BUILTIN_MERGES {
        let (left, right) = (byte_level(left), byte_level(right));
        let id = vocab.len();
        vocab.insert(format!("{left}{right}"), json!(id));
        merges.push(json!([left, right]));
    }
    let byte_level_cfg = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level_cfg,
        "post_processor": null,
        "decoder": byte_level_cfg,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
    .to_string()
}

/// Writes the built-in tokenizer.json, e.g. next to a demo checkpoint.
pub fn write_builtin_tokenizer_json(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, builtin_tokenizer_json()).map_err(|e| TokenizerError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> Tokenizer {
        Tokenizer::builtin().unwrap()
    }

    #[test]
    fn builtin_vocabulary_has_deepseek_bos_and_eos_ids() {
        let tok = builtin();
        assert_eq!(tok.special().bos, 0);
        assert_eq!(tok.special().eos, 1);
        assert_eq!(tok.vocab_size(), BUILTIN_VOCAB_SIZE);
    }

    #[test]
    fn encoding_adds_no_bos_and_maps_special_text_to_ids() {
        let tok = builtin();
        let s = *tok.special();
        assert_ne!(tok.encode("hi").unwrap()[0], s.bos);
        let ids = tok
            .encode("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>")
            .unwrap();
        assert_eq!(ids[0], s.bos);
        assert_eq!(ids[1], s.user);
        assert_eq!(&ids[ids.len() - 2..], &[s.assistant, s.think_start]);
    }

    #[test]
    fn merges_shorten_common_words() {
        let tok = builtin();
        assert_eq!(tok.encode(" the").unwrap().len(), 1);
        assert_eq!(tok.encode(" and of").unwrap().len(), 2);
    }

    #[test]
    fn decoding_inverts_encoding_for_any_text() {
        let tok = builtin();
        let text =
            "<｜User｜>明天杭州 weather? 📅 tabs\tand\nnewlines</think>done<｜end▁of▁sentence｜>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert!(!tok.decode(&ids, true).unwrap().contains(EOS_TOKEN));
        assert!(tok.decode(&ids, true).unwrap().contains(THINK_END_TOKEN));
    }

    #[test]
    fn streaming_decode_never_splits_a_character() {
        let tok = builtin();
        let text = "Hi 杭州🌤️ the end, ünïcödé";
        let ids = tok.encode(text).unwrap();
        assert!(
            ids.len() > text.chars().count(),
            "multi-byte chars span several byte tokens"
        );
        let mut stream = tok.decode_stream(false);
        let mut pieces = Vec::new();
        for id in ids {
            pieces.extend(stream.step(id).unwrap());
        }
        pieces.extend(stream.flush().unwrap());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn an_overlong_text_is_refused_after_encoding_a_bounded_prefix() {
        let tok = builtin();
        let text = "word and more words, ".repeat(100);
        let ids = tok.encode(&text).unwrap();
        assert_eq!(tok.encode_within(&text, ids.len()).unwrap(), ids);
        assert!(matches!(
            tok.encode_within(&text, ids.len() - 1),
            Err(TokenizerError::TooLong { .. })
        ));
        // Refused after its first piece: a full encode of these 64 MiB would take a minute
        // and gigabytes of memory.
        let huge = "x ".repeat(32 << 20);
        assert!(matches!(
            tok.encode_within(&huge, 1000),
            Err(TokenizerError::TooLong { limit: 1000 })
        ));
        let (head, rest) = split_piece(&huge, COUNT_PIECE_BYTES);
        assert!(head.len() <= COUNT_PIECE_BYTES && rest.starts_with(' '));
        assert_eq!(split_piece("ab", 64), ("ab", ""));
        let wide = "杭".repeat(100);
        let (head, _) = split_piece(&wide, 10);
        assert_eq!(head, "杭杭杭");
    }

    #[test]
    fn skipping_special_tokens_drops_bos_and_eos_but_keeps_the_thinking_tags() {
        let tok = builtin();
        let ids = tok
            .encode("<｜begin▁of▁sentence｜>a<think>b</think>c<｜end▁of▁sentence｜>")
            .unwrap();
        let run = |skip: bool| {
            let mut stream = tok.decode_stream(skip);
            let mut out: String = ids
                .iter()
                .filter_map(|id| stream.step(*id).unwrap())
                .collect();
            out.extend(stream.flush().unwrap());
            out
        };
        assert_eq!(run(true), "a<think>b</think>c");
        assert_eq!(
            run(false),
            "<｜begin▁of▁sentence｜>a<think>b</think>c<｜end▁of▁sentence｜>"
        );
    }

    #[test]
    fn a_dangling_partial_character_is_flushed_as_a_replacement() {
        let tok = builtin();
        let first_byte_of_zh = tok.encode("杭").unwrap()[0];
        let mut stream = tok.decode_stream(false);
        assert_eq!(stream.step(first_byte_of_zh).unwrap(), None);
        assert_eq!(stream.flush().unwrap().as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn the_written_builtin_file_loads_with_the_same_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        write_builtin_tokenizer_json(&path).unwrap();
        let from_file = Tokenizer::from_file(&path).unwrap();
        let text = "<｜User｜>the cat<｜Assistant｜>";
        assert_eq!(
            from_file.encode(text).unwrap(),
            builtin().encode(text).unwrap()
        );
    }

    #[test]
    fn a_vocabulary_without_think_tokens_is_rejected_by_name() {
        let mut json: serde_json::Value = serde_json::from_str(&builtin_tokenizer_json()).unwrap();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["content"] != THINK_START_TOKEN);
        json["model"]["vocab"]
            .as_object_mut()
            .unwrap()
            .remove(THINK_START_TOKEN);
        let err = Tokenizer::from_json_str(&json.to_string()).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::MissingSpecialToken {
                token: THINK_START_TOKEN,
                ..
            }
        ));
    }

    #[test]
    fn a_missing_file_is_a_load_error() {
        let err = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert_eq!(err.metric_label(), "load");
    }
}
