//! Writing safetensors: the whole layout (shards, headers, offsets, index) is planned before any
//! data is written; files are created at full size and tensor bytes are written into their final
//! place with positional writes (`pwrite`), from any thread; `finish` fsyncs every file and writes
//! the index; `abort` removes what was created.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{dtype_bytes, read::INDEX_NAME, read::SINGLE_NAME, Dtype};
use crate::error::{Error, Result};

/// A tensor to be written.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn nbytes(&self) -> u64 {
        let n: u64 = self.shape.iter().map(|&d| d as u64).product();
        (n * self.dtype.bitsize() as u64).div_ceil(8)
    }
}

/// Where one tensor goes.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub shard: usize,
    /// Absolute byte offset in the shard file.
    pub start: u64,
    pub nbytes: u64,
}

#[derive(Debug, Clone)]
pub struct ShardLayout {
    pub file_name: String,
    /// 8-byte length prefix + JSON header padded with spaces to a multiple of 8.
    pub header: Vec<u8>,
    pub file_len: u64,
    /// Indices into the tensor list, in data order.
    pub tensors: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub shards: Vec<ShardLayout>,
    pub slots: Vec<Slot>,
    pub total_size: u64,
    pub names: Vec<String>,
}

/// Plans shards (greedy, in tensor order, a new shard when the byte budget would be exceeded;
/// a tensor larger than the budget gets a shard of its own) and each shard's header. Within a
/// shard, tensors are stored by decreasing element size (stable), so every tensor is aligned to
/// its element size.
pub fn plan_layout(
    tensors: &[OutTensor],
    metadata: &BTreeMap<String, String>,
    shard_size: u64,
) -> Layout {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let nb = t.nbytes();
        if !groups.last().unwrap().is_empty() && cur + nb > shard_size {
            groups.push(Vec::new());
            cur = 0;
        }
        groups.last_mut().unwrap().push(i);
        cur += nb;
    }
    let n = groups.len();
    let mut slots = vec![
        Slot {
            shard: 0,
            start: 0,
            nbytes: 0
        };
        tensors.len()
    ];
    let mut shards = Vec::with_capacity(n);
    for (si, mut g) in groups.into_iter().enumerate() {
        g.sort_by_key(|&i| std::cmp::Reverse(dtype_bytes(tensors[i].dtype).unwrap_or(0)));
        let mut json = String::from("{");
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("string map"));
        let mut off = 0u64;
        for &i in &g {
            let t = &tensors[i];
            let nb = t.nbytes();
            json.push(',');
            json.push_str(&serde_json::to_string(&t.name).expect("string"));
            json.push_str(&format!(
                ":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
                t.dtype,
                serde_json::to_string(&t.shape).expect("shape"),
                off,
                off + nb
            ));
            slots[i] = Slot {
                shard: si,
                start: off,
                nbytes: nb,
            };
            off += nb;
        }
        json.push('}');
        while json.len() % 8 != 0 {
            json.push(' ');
        }
        let mut header = Vec::with_capacity(8 + json.len());
        header.extend_from_slice(&(json.len() as u64).to_le_bytes());
        header.extend_from_slice(json.as_bytes());
        let hl = header.len() as u64;
        for &i in &g {
            slots[i].start += hl;
        }
        let file_name = if n == 1 {
            SINGLE_NAME.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        shards.push(ShardLayout {
            file_name,
            header,
            file_len: hl + off,
            tensors: g,
        });
    }
    let total_size = tensors.iter().map(|t| t.nbytes()).sum();
    Layout {
        shards,
        slots,
        total_size,
        names: tensors.iter().map(|t| t.name.clone()).collect(),
    }
}

/// Start writing dirty pages back to disk every this many bytes, so that the final fsync does not
/// have to wait for the whole output (the kernel would otherwise hold it in the page cache).
const WRITEBACK_STEP: u64 = 64 << 20;

/// Asks the kernel to start (not wait for) writeback of a file's dirty pages.
fn start_writeback(f: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid open descriptor; the call only schedules I/O. Errors are not fatal
        // here: the final fsync reports them.
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

/// Open output files of a planned layout.
pub struct Writer {
    pub dir: PathBuf,
    pub layout: Layout,
    files: Vec<File>,
    /// Bytes written per shard, to start writeback every `WRITEBACK_STEP` bytes.
    written: Vec<AtomicU64>,
    created: Vec<PathBuf>,
    done: bool,
}

impl Writer {
    /// Creates every shard at full size (refusing to overwrite) and writes the headers.
    pub fn create(dir: &Path, layout: Layout) -> Result<Writer> {
        let mut w = Writer {
            dir: dir.to_path_buf(),
            layout,
            files: Vec::new(),
            written: Vec::new(),
            created: Vec::new(),
            done: false,
        };
        for s in &w.layout.shards {
            let p = dir.join(&s.file_name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            w.created.push(p.clone());
            f.set_len(s.file_len).map_err(|e| Error::io(&p, e))?;
            f.write_all_at(&s.header, 0).map_err(|e| Error::io(&p, e))?;
            w.files.push(f);
            w.written.push(AtomicU64::new(0));
        }
        Ok(w)
    }

    /// Writes `bytes` at byte `offset` within tensor `t`'s slot. Safe to call from many threads
    /// for disjoint ranges.
    pub fn write(&self, t: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let s = self.layout.slots[t];
        assert!(
            offset + bytes.len() as u64 <= s.nbytes,
            "write past the end of tensor {t}"
        );
        let f = &self.files[s.shard];
        f.write_all_at(bytes, s.start + offset)
            .map_err(|e| Error::io(&self.created[s.shard], e))?;
        let len = bytes.len() as u64;
        let after = self.written[s.shard].fetch_add(len, Ordering::Relaxed) + len;
        if after / WRITEBACK_STEP != (after - len) / WRITEBACK_STEP {
            start_writeback(f);
        }
        Ok(())
    }

    /// fsyncs every shard, writes the index for sharded output, fsyncs the directory.
    /// Returns the file names.
    pub fn finish(mut self) -> Result<Vec<String>> {
        for (f, p) in self.files.iter().zip(&self.created) {
            f.sync_all().map_err(|e| Error::io(p, e))?;
        }
        let mut names: Vec<String> = self
            .layout
            .shards
            .iter()
            .map(|s| s.file_name.clone())
            .collect();
        if self.layout.shards.len() > 1 {
            let mut wm = serde_json::Map::new();
            for (i, name) in self.layout.names.iter().enumerate() {
                let s = self.layout.slots[i].shard;
                wm.insert(
                    name.clone(),
                    serde_json::Value::String(self.layout.shards[s].file_name.clone()),
                );
            }
            let index = serde_json::json!({
                "metadata": {"total_size": self.layout.total_size},
                "weight_map": wm,
            });
            let p = self.dir.join(INDEX_NAME);
            let text = serde_json::to_string_pretty(&index).expect("json");
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            self.created.push(p.clone());
            f.write_all_at(text.as_bytes(), 0)
                .map_err(|e| Error::io(&p, e))?;
            f.sync_all().map_err(|e| Error::io(&p, e))?;
            names.push(INDEX_NAME.to_string());
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.done = true;
        Ok(names)
    }

    /// Removes every file this writer created.
    pub fn abort(mut self) {
        self.remove_created();
    }

    fn remove_created(&mut self) {
        self.files.clear();
        for p in self.created.drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.done {
            self.remove_created();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::read::Model;

    fn t(name: &str, dtype: Dtype, shape: &[usize]) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn single_shard_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let ts = vec![
            t("b", Dtype::BF16, &[3]),
            t("a", Dtype::F32, &[2, 2]),
            t("c\"x", Dtype::U8, &[5]),
        ];
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "pt".to_string());
        let layout = plan_layout(&ts, &md, 1 << 30);
        assert_eq!(layout.shards.len(), 1);
        assert_eq!(layout.shards[0].header.len() % 8, 0);
        let w = Writer::create(dir.path(), layout).unwrap();
        w.write(0, 0, &[1, 2, 3, 4, 5, 6]).unwrap();
        let f: Vec<u8> = (0..16).collect();
        w.write(1, 0, &f[..8]).unwrap();
        w.write(1, 8, &f[8..]).unwrap();
        w.write(2, 0, b"hello").unwrap();
        let files = w.finish().unwrap();
        assert_eq!(files, vec!["model.safetensors"]);
        let m = Model::open(dir.path()).unwrap();
        assert_eq!(m.bytes(m.get("b").unwrap()), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(m.bytes(m.get("a").unwrap()), &f[..]);
        assert_eq!(m.bytes(m.get("c\"x").unwrap()), b"hello");
        // F32 first: aligned.
        assert_eq!(m.get("a").unwrap().start % 4, 0);
        assert_eq!(m.files[0].metadata.as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn sharded_roundtrip_and_abort() {
        let dir = tempfile::tempdir().unwrap();
        let ts: Vec<OutTensor> = (0..5)
            .map(|i| t(&format!("w{i}"), Dtype::F32, &[4]))
            .collect();
        let layout = plan_layout(&ts, &BTreeMap::new(), 32);
        assert_eq!(layout.shards.len(), 3);
        assert_eq!(
            layout.shards[2].file_name,
            "model-00003-of-00003.safetensors"
        );
        let w = Writer::create(dir.path(), layout.clone()).unwrap();
        for i in 0..5 {
            w.write(i, 0, &[i as u8; 16]).unwrap();
        }
        let files = w.finish().unwrap();
        assert_eq!(files.len(), 4);
        let m = Model::open(dir.path()).unwrap();
        for i in 0..5 {
            assert_eq!(m.bytes(m.get(&format!("w{i}")).unwrap()), &[i as u8; 16]);
        }
        let idx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_NAME)).unwrap())
                .unwrap();
        assert_eq!(idx["metadata"]["total_size"], 80);
        // Abort removes created files.
        let dir2 = tempfile::tempdir().unwrap();
        let w = Writer::create(dir2.path(), layout).unwrap();
        w.abort();
        assert_eq!(std::fs::read_dir(dir2.path()).unwrap().count(), 0);
    }
}
