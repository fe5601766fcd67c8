//! Tag text: the one splitter of a tag generator's raw output and the one definition of the
//! whitespace trimmed around a tag.
//!
//! Whitespace is what Python's `str.isspace()` (and so `str.strip()`) calls whitespace, so that
//! Rust and Python agree on every input: Unicode White_Space (`char::is_whitespace`) plus the
//! four information separators U+001C..=U+001F, which Python counts and Rust does not.

/// Whether `c` is whitespace in Python's sense (`c.isspace()`).
#[inline]
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `s` without leading and trailing whitespace, as Python's `s.strip()` gives it.
#[inline]
pub fn trim(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// Splits a tag generator's raw output `"a, b, c"` into trimmed, non-empty tags: Python's
/// `[t.strip() for t in raw.split(",") if t.strip()]`.
pub fn split_tags(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_generator_output() {
        let v: Vec<&str> = split_tags(" Poem ,, Text Rewriting,").collect();
        assert_eq!(v, ["Poem", "Text Rewriting"]);
    }

    #[test]
    fn whitespace_is_pythons() {
        // U+001C..U+001F: whitespace to Python, not to char::is_whitespace.
        assert!(!'\u{1c}'.is_whitespace());
        let v: Vec<&str> = split_tags("Poem, \u{1c}, \u{1f}Math\u{85}\u{3000}").collect();
        assert_eq!(v, ["Poem", "Math"]);
        // Not whitespace in either language: zero-width space, byte order mark.
        assert_eq!(trim("\u{200b}a\u{feff}"), "\u{200b}a\u{feff}");
        assert_eq!(trim("\u{a0}\t\n\u{b}\u{c}\r a \u{2028}"), "a");
    }
}
