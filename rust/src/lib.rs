//! TagRouter core: the tag-score store (TagScorer), the cost-aware decider (TagDecider).
//! Pure Rust; the `python` feature adds the PyO3 glue in `py/`.

#[cfg(feature = "python")]
mod py;
