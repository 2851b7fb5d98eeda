//! One error enum for the whole core; `python.rs` maps each variant onto the Python hierarchy
//! defined in `finrecipe/errors.py`.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file is not valid safetensors (header, offsets, dtype sizes, length), or an index is bad.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// The request itself is wrong (unknown method, bad parameter, missing tensor).
    #[error("{0}")]
    Config(String),
    /// Tensors that must agree (shape, dtype, count) do not.
    #[error("{0}")]
    Mismatch(String),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The caller asked to stop (Ctrl-C).
    #[error("cancelled")]
    Cancelled,
    /// A bug in the core (a caught panic); the message says where.
    #[error("internal error in finrecipe's Rust core (please report): {0}")]
    Internal(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
