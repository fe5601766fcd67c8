//! TagRouter core: the tag-score store (TagScorer), the cost-aware decider (TagDecider), theta
//! selection and the store file. Pure Rust; the `python` feature adds the PyO3 glue in `py/`.

// Docs quote the paper's names (TagScorer, M_LLM, w_t) as prose; backticking every one hurts
// reading more than it helps.
#![allow(clippy::doc_markdown)]

pub mod candidates;
pub mod curve;
pub mod decide;
pub mod error;
pub mod live;
pub mod store_io;
pub mod table;
pub mod tags;
pub mod theta;

#[cfg(feature = "python")]
mod py;

pub use candidates::CandidateMask;
pub use decide::{Aggregation, Decider, Explained, Reason, Route, RouteColumns};
pub use error::{Result, RouterError};
pub use live::LiveStore;
pub use table::{Outcome, Params, Record, Store, Weighting};
pub use tags::split_tags;
