//! Stop strings over a stream of text deltas: text that might be the start of a stop string is
//! held back until it is known not to be one, so no stop string (or part of one) is ever sent.
//!
//! Each stop string is matched by a Knuth-Morris-Pratt automaton over the bytes of the text,
//! so a delta costs time proportional to its length times the number of stop strings,
//! however long the stop strings are.

/// One stop string and how much of it the text currently ends with.
#[derive(Debug, Clone)]
struct Stop {
    pattern: Vec<u8>,
    /// `fallback[i]`: the longest proper prefix of `pattern[..=i]` that is also its suffix.
    fallback: Vec<usize>,
    /// Bytes of `pattern` the text seen so far ends with.
    matched: usize,
}

impl Stop {
    fn new(pattern: String) -> Self {
        let pattern = pattern.into_bytes();
        let mut fallback = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fallback[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        Stop {
            pattern,
            fallback,
            matched: 0,
        }
    }

    /// Feeds one byte; true when the whole stop string has just been seen.
    fn advance(&mut self, b: u8) -> bool {
        while self.matched > 0 && self.pattern[self.matched] != b {
            self.matched = self.fallback[self.matched - 1];
        }
        if self.pattern[self.matched] == b {
            self.matched += 1;
        }
        self.matched == self.pattern.len()
    }
}

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<Stop>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(Stop::new)
                .collect(),
            held: String::new(),
        }
    }

    /// Feeds a delta. Returns the text that is safe to emit and whether a stop string matched
    /// (then everything from the stop string on is dropped and the stream is over).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (delta.to_string(), false);
        }
        // `held` ends with every stop's partial match, so offsets into it are well defined.
        let base = self.held.len();
        self.held.push_str(delta);
        let mut earliest: Option<usize> = None;
        for stop in &mut self.stops {
            for (i, b) in delta.bytes().enumerate() {
                if stop.advance(b) {
                    let start = base + i + 1 - stop.pattern.len();
                    earliest = Some(earliest.map_or(start, |e| e.min(start)));
                    break;
                }
            }
        }
        if let Some(at) = earliest {
            // A match starts on a stop string's first byte, so on a character boundary.
            let out = self.held[..at].to_string();
            self.held.clear();
            // Text pushed after a match starts afresh (and no automaton is left complete).
            for stop in &mut self.stops {
                stop.matched = 0;
            }
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string; it starts
        // on a stop string's first byte, so on a character boundary.
        let keep = self.stops.iter().map(|s| s.matched).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Text still held back when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_string_split_across_deltas_is_caught_and_never_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".into(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("D and more"), (String::new(), true));
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.push("x"), ("Ex".into(), false));
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.flush(), "EN");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(m.push("xxab"), ("xx".into(), true));
    }

    #[test]
    fn without_stop_strings_text_passes_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("abc"), ("abc".into(), false));
    }

    #[test]
    fn a_partial_match_that_fails_falls_back_to_a_shorter_one() {
        let mut m = StopMatcher::new(vec!["aab".into()]);
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.push("a"), ("a".into(), false));
        assert_eq!(m.push("bc"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["abab".into()]);
        assert_eq!(m.push("xabaabab"), ("xaba".into(), true));
    }

    #[test]
    fn text_pushed_after_a_match_is_matched_afresh() {
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xab"), ("x".into(), true));
        assert_eq!(m.push("b"), ("b".into(), false));
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.push("b"), (String::new(), true));
    }

    #[test]
    fn a_longer_stop_string_starting_earlier_wins_over_a_shorter_one_ending_first() {
        let mut m = StopMatcher::new(vec!["bc".into(), "abcd".into()]);
        assert_eq!(m.push("xabcd"), ("x".into(), true));
        let mut m = StopMatcher::new(vec!["bc".into(), "abcd".into()]);
        assert_eq!(m.push("xab"), ("x".into(), false));
        assert_eq!(m.push("cd"), (String::new(), true));
    }

    #[test]
    fn long_stop_strings_cost_time_linear_in_the_text() {
        // Sixteen 4 KiB stop strings that almost match everywhere, over 1 MiB of text: the
        // naive suffix scan would compare about 16 * 4096^2 bytes per delta.
        let stops: Vec<String> = (0..16)
            .map(|i| format!("{}{}", "a".repeat(4095), char::from(b'b' + i)))
            .collect();
        let mut m = StopMatcher::new(stops);
        let mut emitted = 0;
        for _ in 0..(1 << 20) / 64 {
            emitted += m.push(&"a".repeat(64)).0.len();
        }
        assert_eq!(emitted + m.flush().len(), 1 << 20);
    }

    #[test]
    fn multibyte_stop_strings_are_held_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["好的".into()]);
        assert_eq!(m.push("你好"), ("你".into(), false));
        assert_eq!(m.push("的"), (String::new(), true));
    }
}
