//! Reading safetensors: every file memory-mapped, every header validated with the `safetensors`
//! crate's rules (header size bounds, UTF-8 JSON, dtype byte sizes, contiguous non-overlapping
//! offsets that cover the data exactly, file length), sharded checkpoints checked against their
//! `model.safetensors.index.json`.
//!
//! Tensor data is never reinterpreted in place: callers get byte slices (which may be unaligned)
//! and convert them with `from_le_bytes` (see `dtype.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::SafeTensors;

use super::Dtype;
use crate::error::{Error, Result};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// One tensor of a model: where its bytes are and what they mean.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into [`Model::files`].
    pub file: usize,
    /// Offsets relative to the start of the data section, as in the header.
    pub data_offsets: (usize, usize),
    /// Absolute byte offset of the first byte in the file.
    pub start: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated, memory-mapped safetensors file.
#[derive(Debug)]
pub struct MappedFile {
    pub path: PathBuf,
    pub mmap: Mmap,
    pub metadata: Option<HashMap<String, String>>,
}

/// A model: one file, or the shards of an index, all mapped and validated.
#[derive(Debug)]
pub struct Model {
    pub path: PathBuf,
    pub files: Vec<MappedFile>,
    /// Tensors in file order, then offset order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// The index's `metadata` object, when the model is sharded.
    pub index_metadata: Option<serde_json::Value>,
}

fn st_message(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file is shorter than the 8-byte header length prefix".to_string(),
        E::HeaderTooLarge => "declared header length exceeds the 100 MB limit".to_string(),
        E::InvalidHeaderLength => "declared header length runs past the end of the file".to_string(),
        E::MetadataIncompleteBuffer => {
            "tensor data does not exactly cover the rest of the file (truncated or has trailing bytes)"
                .to_string()
        }
        E::TensorInvalidInfo => {
            "a tensor's data_offsets span does not equal its shape × dtype size".to_string()
        }
        E::InvalidOffset(name) => format!(
            "data_offsets of tensor '{name}' are not contiguous with the previous tensor (gap, overlap or end before start)"
        ),
        other => other.to_string(),
    }
}

const CORRUPT_HINT: &str = "; the file is corrupt or truncated: re-download or re-save it";

/// A file's `__metadata__` string map.
pub type Metadata = Option<HashMap<String, String>>;

/// Validates the bytes of one safetensors file (`path` only names it in errors) and lists its
/// tensors in data order. Never panics, whatever `bytes` holds (see rust/tests/fuzz.rs).
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<(Vec<TensorInfo>, Metadata)> {
    if bytes.len() < 8 {
        return Err(Error::format(
            path,
            format!(
                "file is {} bytes, shorter than the 8-byte header length prefix{CORRUPT_HINT}",
                bytes.len()
            ),
        ));
    }
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "invalid safetensors header: {}{CORRUPT_HINT}",
                st_message(&e)
            ),
        )
    })?;
    let data_start = 8 + n;
    let mut tensors: Vec<TensorInfo> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| TensorInfo {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            file: 0,
            data_offsets: info.data_offsets,
            start: data_start + info.data_offsets.0,
        })
        .collect();
    tensors.sort_by_key(|t| (t.data_offsets, t.nbytes()));
    Ok((tensors, meta.metadata().clone()))
}

/// Opens `path` for reading only if it is a regular file: a FIFO, a device or a socket (or a
/// symlink to one) is refused without blocking on it.
fn open_regular(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            "not a regular file (a device, pipe or socket); a model directory holds plain files",
        ));
    }
    Ok(file)
}

/// Maps and validates one safetensors file.
pub fn open_file(path: &Path) -> Result<(MappedFile, Vec<TensorInfo>)> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(Error::format(
            path,
            format!(
                "file is {len} bytes, shorter than the 8-byte header length prefix{CORRUPT_HINT}"
            ),
        ));
    }
    // SAFETY: the mapping is read-only; we assume no one truncates the file while we read it
    // (as every mmap-based safetensors reader does).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (tensors, metadata) = parse_header(path, &mmap[..])?;
    Ok((
        MappedFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
        },
        tensors,
    ))
}

/// Validates an in-memory safetensors file as if it were at `path` (tests and the fuzz target).
pub fn file_from_bytes(path: &Path, bytes: &[u8]) -> Result<(MappedFile, Vec<TensorInfo>)> {
    let (tensors, metadata) = parse_header(path, bytes)?;
    let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(|e| Error::io(path, e))?;
    m[..bytes.len()].copy_from_slice(bytes);
    let mmap = m.make_read_only().map_err(|e| Error::io(path, e))?;
    Ok((
        MappedFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
        },
        tensors,
    ))
}

/// A shard name an index may use: one path component, no separators, not `.` or `..`, no NUL.
pub fn plain_file_name(f: &str) -> bool {
    !(f.is_empty()
        || f.contains('/')
        || f.contains('\\')
        || f.contains('\0')
        || f == "."
        || f == "..")
}

#[derive(serde::Deserialize)]
struct IndexFile {
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

impl Model {
    /// Opens a model directory (`model.safetensors`, or shards + `model.safetensors.index.json`)
    /// or a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            let (f, tensors) = open_file(path)?;
            return Ok(Self::assemble(path, vec![(f, tensors)], None));
        }
        if !meta.is_dir() {
            return Err(Error::format(
                path,
                "neither a regular file nor a directory (a device, pipe or socket)",
            ));
        }
        // `exists`, not `is_file`: a FIFO or device under these names is refused by `open_regular`
        // with a clear message instead of being reported missing.
        let index = path.join(INDEX_NAME);
        if index.exists() {
            return Self::open_sharded(path, &index);
        }
        let single = path.join(SINGLE_NAME);
        if single.exists() {
            let (f, tensors) = open_file(&single)?;
            return Ok(Self::assemble(path, vec![(f, tensors)], None));
        }
        Err(Error::format(
            path,
            format!(
                "no {SINGLE_NAME} or {INDEX_NAME} in this directory; point to a Hugging Face model \
                 directory saved with safetensors (save_pretrained(..., safe_serialization=True))"
            ),
        ))
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Model> {
        let text = {
            let f = open_regular(index)?;
            let mut text = String::new();
            use std::io::Read;
            // An index is a small JSON file: read at most 100 MB of it.
            f.take(100 << 20)
                .read_to_string(&mut text)
                .map_err(|e| Error::io(index, e))?;
            text
        };
        Self::sharded_from(dir, index, &text, |name| {
            let p = dir.join(name);
            if std::fs::symlink_metadata(&p).is_err() {
                return Err(Error::format(
                    index,
                    format!(
                        "weight_map refers to shard '{name}', which does not exist in {}",
                        dir.display()
                    ),
                ));
            }
            open_file(&p)
        })
    }

    /// A sharded model from its index text; `open` maps and validates one shard by file name
    /// (only names that are plain file names of the model directory reach it).
    pub fn sharded_from(
        dir: &Path,
        index: &Path,
        text: &str,
        mut open: impl FnMut(&str) -> Result<(MappedFile, Vec<TensorInfo>)>,
    ) -> Result<Model> {
        let idx: IndexFile = serde_json::from_str(text).map_err(|e| {
            Error::format(
                index,
                format!("not a valid index (expected {{\"metadata\": ..., \"weight_map\": {{tensor: file}}}}): {e}"),
            )
        })?;
        let mut shard_names: Vec<String> = Vec::new();
        for f in idx.weight_map.values() {
            if !shard_names.contains(f) {
                if !plain_file_name(f) {
                    return Err(Error::format(
                        index,
                        format!("weight_map names shard '{f}', which is not a plain file name in the model directory; refusing to read files outside it"),
                    ));
                }
                shard_names.push(f.clone());
            }
        }
        shard_names.sort();
        if shard_names.is_empty() {
            return Err(Error::format(index, "weight_map is empty"));
        }
        let mut opened = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            opened.push(open(name)?);
        }
        let model = Self::assemble(dir, opened, idx.metadata);
        // The index must agree with the shards, both ways.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for t in &model.tensors {
            if let Some(prev) = seen.insert(&t.name, t.file) {
                return Err(Error::format(
                    index,
                    format!(
                        "tensor '{}' is stored in two shards ({} and {}); remove the duplicate",
                        t.name,
                        model.files[prev].path.display(),
                        model.files[t.file].path.display()
                    ),
                ));
            }
        }
        for (tname, fname) in &idx.weight_map {
            let fi = shard_names
                .iter()
                .position(|s| s == fname)
                .expect("listed above");
            match model.by_name.get(tname.as_str()) {
                Some(&ti) if model.tensors[ti].file == fi => {}
                Some(&ti) => {
                    return Err(Error::format(
                        index,
                        format!(
                            "weight_map puts tensor '{tname}' in '{fname}' but it is in '{}'",
                            model.files[model.tensors[ti].file].path.display()
                        ),
                    ))
                }
                None => {
                    return Err(Error::format(
                        index,
                        format!("weight_map lists tensor '{tname}' in '{fname}', but that shard has no such tensor"),
                    ))
                }
            }
        }
        for t in &model.tensors {
            if !idx.weight_map.contains_key(&t.name) {
                return Err(Error::format(
                    index,
                    format!(
                        "shard '{}' holds tensor '{}', which the weight_map does not list",
                        model.files[t.file].path.display(),
                        t.name
                    ),
                ));
            }
        }
        Ok(model)
    }

    fn assemble(
        path: &Path,
        opened: Vec<(MappedFile, Vec<TensorInfo>)>,
        index_metadata: Option<serde_json::Value>,
    ) -> Model {
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        for (fi, (f, ts)) in opened.into_iter().enumerate() {
            files.push(f);
            for mut t in ts {
                t.file = fi;
                tensors.push(t);
            }
        }
        let mut by_name = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            by_name.entry(t.name.clone()).or_insert(i);
        }
        Model {
            path: path.to_path_buf(),
            files,
            tensors,
            by_name,
            index_metadata,
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw little-endian bytes of a tensor (possibly unaligned).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.files[t.file].mmap[t.start..t.start + t.nbytes()]
    }

    /// A JSON description: files, tensors (dtype, shape, file, data_offsets), metadata.
    pub fn describe(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let files: Vec<Value> = self
            .files
            .iter()
            .map(|f| {
                Value::String(
                    f.path
                        .file_name()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            })
            .collect();
        let mut tensors = Map::new();
        for t in &self.tensors {
            tensors.insert(
                t.name.clone(),
                json!({
                    "dtype": t.dtype.to_string(),
                    "shape": t.shape,
                    "file": files[t.file],
                    "data_offsets": [t.data_offsets.0, t.data_offsets.1],
                }),
            );
        }
        let mut metadata = Map::new();
        for f in &self.files {
            if let Some(m) = &f.metadata {
                for (k, v) in m {
                    metadata.insert(k.clone(), Value::String(v.clone()));
                }
            }
        }
        let mut out = json!({"files": files, "tensors": tensors, "metadata": metadata});
        if let Some(im) = &self.index_metadata {
            out["index_metadata"] = im.clone();
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds safetensors bytes from a raw header string and data.
    pub fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn err(bytes: &[u8]) -> String {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "x.safetensors", bytes);
        match Model::open(&p) {
            Err(Error::Format { path, msg }) => {
                assert_eq!(path, p);
                msg
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn reads_good_file_with_unaligned_data() {
        // Header length 69 (not a multiple of 8): data starts unaligned.
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}"#;
        let mut data = Vec::new();
        data.extend_from_slice(&1.5f32.to_le_bytes());
        data.extend_from_slice(&(-2.0f32).to_le_bytes());
        data.extend_from_slice(&0x3F80u16.to_le_bytes());
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "model.safetensors", &raw(h, &data));
        let m = Model::open(d.path()).unwrap();
        let a = m.get("a").unwrap();
        assert_eq!(a.shape, vec![2]);
        let mut out = [0f32; 2];
        crate::dtype::load_f32(a.dtype, m.bytes(a), &mut out);
        assert_eq!(out, [1.5, -2.0]);
        let b = m.get("b").unwrap();
        assert_eq!(m.bytes(b), &[0x80, 0x3F]);
        assert_eq!(m.describe()["tensors"]["b"]["dtype"], "BF16");
    }

    #[test]
    fn rejects_hostile_headers() {
        assert!(err(b"abc").contains("shorter than the 8-byte"));
        let mut huge = (200_000_000u64).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(err(&huge).contains("100 MB"));
        let mut past = (64u64).to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(err(&past).contains("past the end"));
        assert!(err(&raw("{not json", b"")).contains("JSON"));
        assert!(err(&raw("\"just a string\"", b"")).contains("JSON"));
        // Wrong dtype size: 2 F32 elements need 8 bytes.
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,6]}}"#;
        assert!(err(&raw(h, &[0; 6])).contains("shape × dtype"));
        // Gap between tensors.
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#;
        assert!(err(&raw(h, &[0; 5])).contains("not contiguous"));
        // Overlap.
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        assert!(err(&raw(h, &[0; 3])).contains("not contiguous"));
        // Truncated data / trailing bytes.
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(err(&raw(h, &[0; 3])).contains("truncated"));
        assert!(err(&raw(h, &[0; 5])).contains("truncated"));
        // Unknown dtype, shape overflow.
        let h = r#"{"a":{"dtype":"Q7","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(err(&raw(h, &[0; 4])).contains("JSON"));
        let h = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
        assert!(err(&raw(h, &[0; 4])).contains("overflow"));
    }

    fn shard(dir: &Path, name: &str, tensors: &[&str]) {
        let mut h = String::from("{");
        for (i, t) in tensors.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&format!(
                r#""{t}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                i + 1
            ));
        }
        h.push('}');
        write(dir, name, &raw(&h, &vec![7u8; tensors.len()]));
    }

    fn index(dir: &Path, map: &[(&str, &str)]) {
        let wm: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        let j = serde_json::json!({"metadata": {"total_size": 3}, "weight_map": wm});
        write(dir, INDEX_NAME, j.to_string().as_bytes());
    }

    #[test]
    fn sharded_index_must_agree() {
        let d = tempfile::tempdir().unwrap();
        shard(d.path(), "s1.safetensors", &["a", "b"]);
        shard(d.path(), "s2.safetensors", &["c"]);
        index(
            d.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s1.safetensors"),
                ("c", "s2.safetensors"),
            ],
        );
        let m = Model::open(d.path()).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.get("c").unwrap().file, 1);

        let fmt = |r: Result<Model>| match r {
            Err(Error::Format { msg, .. }) => msg,
            other => panic!("expected format error, got {other:?}"),
        };
        // Index points to a tensor missing from its shard.
        index(
            d.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s1.safetensors"),
                ("c", "s2.safetensors"),
                ("z", "s2.safetensors"),
            ],
        );
        assert!(fmt(Model::open(d.path())).contains("no such tensor"));
        // Index points to a missing shard.
        index(
            d.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s1.safetensors"),
                ("c", "s3.safetensors"),
            ],
        );
        assert!(fmt(Model::open(d.path())).contains("does not exist"));
        // Wrong shard for a tensor.
        index(
            d.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s1.safetensors"),
                ("c", "s1.safetensors"),
            ],
        );
        let e = fmt(Model::open(d.path()));
        assert!(
            e.contains("no such tensor") || e.contains("but it is in"),
            "{e}"
        );
        // Tensor not listed.
        index(
            d.path(),
            &[("a", "s1.safetensors"), ("c", "s2.safetensors")],
        );
        assert!(fmt(Model::open(d.path())).contains("does not list"));
        // Same tensor in two shards.
        shard(d.path(), "s2.safetensors", &["c", "a"]);
        index(
            d.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s1.safetensors"),
                ("c", "s2.safetensors"),
            ],
        );
        assert!(fmt(Model::open(d.path())).contains("two shards"));
        // Path escape.
        index(d.path(), &[("a", "../s1.safetensors")]);
        assert!(fmt(Model::open(d.path())).contains("plain file name"));
        // Not JSON.
        write(d.path(), INDEX_NAME, b"{");
        assert!(fmt(Model::open(d.path())).contains("not a valid index"));
        // Empty directory.
        let e = tempfile::tempdir().unwrap();
        assert!(fmt(Model::open(e.path())).contains("no model.safetensors"));
    }
}
