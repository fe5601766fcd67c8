//! The one error type of the core. The Python glue maps each variant to one exception class.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A caller-supplied argument is out of its domain (NaN cost, unknown outcome label, ...).
    #[error("{0}")]
    InvalidArgument(String),

    /// A model name that the store (or the decider's candidate set) does not know.
    #[error("unknown model {}; known models: {known}", pyrepr(.name))]
    UnknownModel { name: String, known: String },

    /// A decision restricted to a subset of the candidates (`Decider::route_ids_among`) with
    /// no candidate in the subset.
    #[error("{0}")]
    NoCandidate(String),

    /// A tag that the store does not know (only raised where a tag is looked up on purpose).
    #[error("unknown tag {}", pyrepr(.0))]
    UnknownTag(String),

    /// Records or stores that contradict each other (one query with two tag sets, a model
    /// that `with_model` would add twice, ...).
    #[error("{0}")]
    Inconsistent(String),

    /// A store file that is not a store, of another format version, truncated or corrupt.
    #[error("{path}: {reason}")]
    StoreFormat { path: PathBuf, reason: String },

    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RouterError {
    #[cold]
    #[inline(never)]
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn unknown_model(name: &str, known: &[String]) -> Self {
        const SHOWN: usize = 8;
        let mut list: Vec<String> = known.iter().take(SHOWN).map(|m| pyrepr(m)).collect();
        if known.len() > SHOWN {
            list.push(format!("... ({} in all)", known.len()));
        }
        Self::UnknownModel {
            name: name.to_owned(),
            known: format!("[{}]", list.join(", ")),
        }
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn no_candidate(msg: impl Into<String>) -> Self {
        Self::NoCandidate(msg.into())
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn inconsistent(msg: impl Into<String>) -> Self {
        Self::Inconsistent(msg.into())
    }
}

/// `s` quoted the way Python's `repr()` quotes a str, so messages read naturally in Python.
pub fn pyrepr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Result alias of the core.
pub type Result<T, E = RouterError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::pyrepr;

    #[test]
    fn quotes_like_python() {
        assert_eq!(pyrepr("abc"), "'abc'");
        assert_eq!(pyrepr("it's"), "\"it's\"");
        assert_eq!(pyrepr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(pyrepr("x\ny\\"), "'x\\ny\\\\'");
    }
}
