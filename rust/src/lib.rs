//! finrecipe's core: memory-mapped safetensors I/O, streaming merges and task-vector analysis.
//!
//! The pure-Rust core is usable (and tested) without Python; the `python` feature adds the
//! `finrecipe._core` extension module in `python.rs`, which only converts arguments, releases the
//! GIL and maps errors.

pub mod analyze;
pub mod dtype;
pub mod error;
pub mod fsutil;
pub mod inplace;
pub mod merge;
pub mod safetensors;

#[cfg(feature = "python")]
mod inplace_py;
#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
