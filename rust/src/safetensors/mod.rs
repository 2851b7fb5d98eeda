//! safetensors I/O: validated, memory-mapped reading ([`read`]) and planned, in-place writing
//! ([`write`]).

pub mod read;
pub mod write;

pub use ::safetensors::Dtype;

/// Bytes per element for whole-byte dtypes; `None` for sub-byte ones (F4, F6_*).
pub fn dtype_bytes(d: Dtype) -> Option<usize> {
    let bits = d.bitsize();
    if bits.is_multiple_of(8) {
        Some(bits / 8)
    } else {
        None
    }
}

/// Parses a dtype name as written in safetensors headers ("BF16", "F32", ...).
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// The dtype's name as written in safetensors headers.
pub fn dtype_name(d: Dtype) -> String {
    d.to_string()
}
