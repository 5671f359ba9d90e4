//! Tokenization: HF tokenizer.json, DeepSeek special tokens, incremental detokenization.
