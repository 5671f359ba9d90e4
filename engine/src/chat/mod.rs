//! DeepSeek-V3.2 chat encoding and completion parsing.
