//! Teacher targets on disk: write the replies for a corpus once, train several
//! students from them.
//!
//! (The Parquet layouts for Axolotl and DistillKit are in `crate::formats`,
//! the `parquet` feature, on by default; [`ShardReader`] reads those folders
//! too, and without the feature names it in the error.)
//!
//! A target set is a directory of safetensors shards `targets-00000.safetensors`,
//! `targets-00001.safetensors`, … each holding whole sequences, columnar:
//!
//! | tensor | dtype | shape | meaning |
//! | --- | --- | --- | --- |
//! | `sequence_offsets` | U32 | [S + 1] | sequence s owns positions `sequence_offsets[s]..[s+1]` |
//! | `first_position` | U32 | [S] | first returned position of each sequence |
//! | `offsets` | U32 | [P + 1] | position p owns entries `offsets[p]..[p+1]` |
//! | `token_ids` | U32 | [N] | sampled ids, ascending per position |
//! | `counts` | U32 | [N] | draws per id |
//! | `logprobs` | F32 | [N] | teacher log p |
//! | `lse` | F32 | [P] | log-sum-exp of z / T per position |
//!
//! Targets that carry the on-policy columns (the realised tokens' log p and
//! rank, candidates' log p) add, in format 2:
//!
//! | tensor | dtype | shape | meaning |
//! | --- | --- | --- | --- |
//! | `token_logprobs` | F32 | [P] | log p of the realised next token (NaN at a sequence's last position) |
//! | `token_ranks` | U32 | [P] | its rank (1 = most likely; 0 where there is none) |
//! | `candidate_offsets` | U32 | [P + 1] | position p owns candidates `candidate_offsets[p]..[p+1]` |
//! | `candidate_logprobs` | F32 | [C] | log p at the candidate ids asked for |
//!
//! The safetensors metadata carries `logitd.format` (1, or 2 with those
//! columns; a reader of format 1 refuses format 2 by its number), `model_id`,
//! `tokenizer_sha256`, `num_samples`, `temperature`, `seed`, `method` and
//! `value_encoding` (what the server reported), so a reader can refuse targets
//! from another teacher. Values are stored exactly as decoded (f32), so a read
//! gives back bit-identical targets.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use logitd_proto::csr;
use safetensors::{Dtype, SafeTensors};

use crate::TeacherTargets;

/// Format version of shards without the on-policy columns.
pub const FORMAT_VERSION: &str = "1";
/// Format version of shards with them (token or candidate log-probabilities).
pub const FORMAT_VERSION_SCORES: &str = "2";

/// Why a shard could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid shard.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Shards of one directory disagree, or targets do not fit the writer's metadata.
    #[error("{0}")]
    Mismatch(String),
}

/// What produced a target set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardMeta {
    /// Teacher model id.
    pub model_id: String,
    /// Teacher tokenizer SHA-256.
    pub tokenizer_sha256: String,
    /// k.
    pub num_samples: u32,
    /// Temperature, as text (exact round trip).
    pub temperature: String,
    /// Seed of the run.
    pub seed: u64,
    /// SamplingMethod as i32.
    pub method: i32,
    /// ValueEncoding the server used on the wire, as i32.
    pub value_encoding: i32,
}

impl ShardMeta {
    /// Refuses targets drawn with another k than this set's.
    pub(crate) fn check_k(&self, t: &TeacherTargets) -> Result<(), ShardError> {
        if t.num_samples == self.num_samples {
            return Ok(());
        }
        Err(ShardError::Mismatch(format!(
            "targets with k = {} do not belong in a set written with k = {}",
            t.num_samples, self.num_samples
        )))
    }

    /// A shard's string metadata: this set's, the shard's first sequence, and
    /// format 2 where it carries the on-policy columns.
    pub(crate) fn shard_metadata(
        &self,
        sequence_start: u64,
        scored: bool,
    ) -> std::collections::BTreeMap<String, String> {
        let mut m: std::collections::BTreeMap<String, String> = self.to_map().into_iter().collect();
        m.insert("sequence_start".into(), sequence_start.to_string());
        if scored {
            m.insert("logitd.format".into(), FORMAT_VERSION_SCORES.into());
        }
        m
    }

    fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            ("logitd.format".into(), FORMAT_VERSION.into()),
            ("model_id".into(), self.model_id.clone()),
            ("tokenizer_sha256".into(), self.tokenizer_sha256.clone()),
            ("num_samples".into(), self.num_samples.to_string()),
            ("temperature".into(), self.temperature.clone()),
            ("seed".into(), self.seed.to_string()),
            ("method".into(), self.method.to_string()),
            ("value_encoding".into(), self.value_encoding.to_string()),
        ])
    }

    fn from_map(m: &HashMap<String, String>, path: &Path) -> Result<Self, ShardError> {
        let invalid = |message: String| ShardError::Invalid { path: path.to_path_buf(), message };
        let get = |k: &str| {
            m.get(k).cloned().ok_or_else(|| invalid(format!("metadata `{k}` is missing")))
        };
        let num = |k: &str| -> Result<i64, ShardError> {
            get(k)?.parse::<i64>().map_err(|e| invalid(format!("metadata `{k}`: {e}")))
        };
        let version = get("logitd.format")?;
        if version != FORMAT_VERSION && version != FORMAT_VERSION_SCORES {
            return Err(invalid(format!(
                "format version {version}, this reader knows {FORMAT_VERSION} and {FORMAT_VERSION_SCORES}"
            )));
        }
        Ok(Self {
            model_id: get("model_id")?,
            tokenizer_sha256: get("tokenizer_sha256")?,
            num_samples: num("num_samples")? as u32,
            temperature: get("temperature")?,
            seed: get("seed")?.parse().map_err(|e| invalid(format!("metadata `seed`: {e}")))?,
            method: num("method")? as i32,
            value_encoding: num("value_encoding")? as i32,
        })
    }
}

/// The buffered shard: every position of its sequences as one CSR target,
/// plus where each sequence starts.
struct Columns {
    sequence_offsets: Vec<u32>,
    first_position: Vec<u32>,
    positions: TeacherTargets,
}

impl Columns {
    fn new(num_samples: u32) -> Self {
        Self {
            sequence_offsets: vec![0],
            first_position: vec![],
            positions: TeacherTargets::empty(num_samples, 0),
        }
    }
}

/// One column of a shard, written little-endian.
enum Column<'a> {
    U32(&'a [u32]),
    F32(&'a [f32]),
}

impl Column<'_> {
    fn dtype(&self) -> &'static str {
        match self {
            Column::U32(_) => "U32",
            Column::F32(_) => "F32",
        }
    }

    fn len(&self) -> usize {
        match self {
            Column::U32(v) => v.len(),
            Column::F32(v) => v.len(),
        }
    }

    /// Writes the values in chunks (no copy of the whole column).
    fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(64 << 10);
        for i in (0..self.len()).step_by(16 << 10) {
            buf.clear();
            match self {
                Column::U32(v) => {
                    v[i..(i + (16 << 10)).min(v.len())]
                        .iter()
                        .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                }
                Column::F32(v) => {
                    v[i..(i + (16 << 10)).min(v.len())]
                        .iter()
                        .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                }
            }
            out.write_all(&buf)?;
        }
        Ok(())
    }
}

/// A shard written to disk: where, which sequences, and its checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShard {
    /// The file.
    pub path: PathBuf,
    /// Global indices of the sequences it holds.
    pub sequences: std::ops::Range<u64>,
    /// Returned positions.
    pub positions: u64,
    /// (id, count, logprob) entries.
    pub entries: u64,
    /// File size.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// The file name of the shard whose first sequence is `start`: names sort in
/// corpus order, also across the workers of one output folder.
pub fn shard_file_name(start: u64) -> String {
    format!("targets-{start:012}.safetensors")
}

/// A writer that hashes what it writes.
struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a safetensors file with a deterministic header (metadata keys
/// sorted, tensors in the order given), so that equal contents give equal
/// bytes: `safetensors::serialize` writes its metadata map in hash order,
/// which differs from process to process.
fn write_safetensors(
    out: &mut impl std::io::Write,
    metadata: &std::collections::BTreeMap<String, String>,
    tensors: &[(&str, Column)],
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut offset = 0usize;
    for (name, data) in tensors {
        let end = offset + 4 * data.len();
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": data.dtype(), "shape": [data.len()], "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    for (_, data) in tensors {
        data.write(out)?;
    }
    Ok(())
}

use std::io::Write as _;

/// A file written atomically: into `path.partial`, then synced, renamed and
/// the directory synced by [`commit`](Self::commit); a crash leaves either no
/// `path` or the whole file. What is written is counted and hashed.
pub(crate) struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Hashing<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    /// Starts `path` (as `path.partial`).
    pub(crate) fn create(path: &Path) -> Result<Self, ShardError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let file = std::fs::File::create(&tmp)
            .map_err(|source| ShardError::Io { path: tmp.clone(), source })?;
        let out =
            Hashing { inner: std::io::BufWriter::new(file), hasher: Default::default(), bytes: 0 };
        Ok(Self { path: path.to_path_buf(), tmp, out })
    }

    /// Syncs and renames the file into place; returns (bytes, sha256).
    pub(crate) fn commit(self) -> Result<(u64, String), ShardError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| ShardError::Io { path: p, source }
        };
        let Hashing { inner, hasher, bytes } = self.out;
        let file = inner.into_inner().map_err(|e| e.into_error()).map_err(io(&self.tmp))?;
        file.sync_all().map_err(io(&self.tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok((bytes, hex(&sha2::Digest::finalize(hasher))))
    }

    /// The error of a failed write into it.
    pub(crate) fn error(&self, source: std::io::Error) -> ShardError {
        ShardError::Io { path: self.tmp.clone(), source }
    }
}

impl std::io::Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Writes `bytes` to `path` atomically (see [`AtomicFile`]).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), ShardError> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).map_err(|e| f.error(e))?;
    f.commit().map(|_| ())
}

fn sync_dir(dir: &Path) -> Result<(), ShardError> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ShardError::Io { path: dir.to_path_buf(), source })
}

/// Writes targets into shards of at most `max_entries` (id, count, logprob)
/// entries each (whole sequences; a larger sequence gets a shard of its own).
/// Each shard is written atomically and records the global indices of its
/// sequences (metadata `sequence_start`, `sequence_end`).
pub struct ShardWriter {
    dir: PathBuf,
    meta: ShardMeta,
    max_entries: usize,
    columns: Columns,
    /// Global index of the first buffered sequence.
    next_sequence: u64,
    written: Vec<PathBuf>,
}

impl ShardWriter {
    /// Creates `dir` (which must not hold shards yet); the first sequence is number 0.
    pub fn create(dir: &Path, meta: ShardMeta, max_entries: usize) -> Result<Self, ShardError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| ShardError::Io { path: dir.to_path_buf(), source })?;
        if !shard_files(dir)?.is_empty() {
            return Err(ShardError::Mismatch(format!(
                "{} already holds target shards",
                dir.display()
            )));
        }
        Ok(Self::starting_at(dir, meta, max_entries, 0))
    }

    /// A writer into an existing `dir` whose first sequence is number
    /// `first_sequence` (the caller decides what the directory may hold).
    pub fn starting_at(
        dir: &Path,
        meta: ShardMeta,
        max_entries: usize,
        first_sequence: u64,
    ) -> Self {
        let columns = Columns::new(meta.num_samples);
        Self {
            dir: dir.to_path_buf(),
            meta,
            max_entries: max_entries.max(1),
            columns,
            next_sequence: first_sequence,
            written: vec![],
        }
    }

    /// Appends the next sequence's targets; returns the shard written when
    /// the buffered ones had to go to disk first.
    pub fn append(&mut self, t: &TeacherTargets) -> Result<Option<WrittenShard>, ShardError> {
        self.meta.check_k(t)?;
        let buffered = self.columns.positions.token_ids.len();
        let written = if buffered > 0 && buffered + t.token_ids.len() > self.max_entries {
            self.flush()?
        } else {
            None
        };
        let c = &mut self.columns;
        c.positions.append(t);
        c.first_position.push(t.first_position);
        c.sequence_offsets.push(c.positions.lse.len() as u32);
        Ok(written)
    }

    fn flush(&mut self) -> Result<Option<WrittenShard>, ShardError> {
        if self.columns.first_position.is_empty() {
            return Ok(None);
        }
        let c = std::mem::replace(&mut self.columns, Columns::new(self.meta.num_samples));
        let start = self.next_sequence;
        let end = start + c.first_position.len() as u64;
        let path = self.dir.join(shard_file_name(start));
        let t = &c.positions;
        let scored = !t.token_logprobs.is_empty() || !t.candidate_offsets.is_empty();
        let mut metadata = self.meta.shard_metadata(start, scored);
        metadata.insert("sequence_end".into(), end.to_string());
        t.validate().map_err(|e| {
            ShardError::Mismatch(format!("the targets of one shard do not fit together: {e}"))
        })?;
        let (positions, entries) = (t.lse.len() as u64, t.token_ids.len() as u64);
        let mut tensors = vec![
            ("sequence_offsets", Column::U32(&c.sequence_offsets)),
            ("first_position", Column::U32(&c.first_position)),
            ("offsets", Column::U32(&t.offsets)),
            ("token_ids", Column::U32(&t.token_ids)),
            ("counts", Column::U32(&t.counts)),
            ("logprobs", Column::F32(&t.logprobs)),
            ("lse", Column::F32(&t.lse)),
        ];
        if !t.token_logprobs.is_empty() {
            tensors.push(("token_logprobs", Column::F32(&t.token_logprobs)));
            tensors.push(("token_ranks", Column::U32(&t.token_ranks)));
        }
        if !t.candidate_offsets.is_empty() {
            tensors.push(("candidate_offsets", Column::U32(&t.candidate_offsets)));
            tensors.push(("candidate_logprobs", Column::F32(&t.candidate_logprobs)));
        }
        let (bytes, sha256) = {
            let mut f = AtomicFile::create(&path)?;
            write_safetensors(&mut f, &metadata, &tensors).map_err(|e| f.error(e))?;
            f.commit()?
        };
        self.next_sequence = end;
        self.written.push(path.clone());
        Ok(Some(WrittenShard { path, sequences: start..end, positions, entries, bytes, sha256 }))
    }

    /// Writes what is buffered and returns the shard files.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, ShardError> {
        self.flush()?;
        Ok(self.written)
    }

    /// Writes what is buffered; returns that last shard, if any.
    pub fn finish_last(mut self) -> Result<Option<WrittenShard>, ShardError> {
        self.flush()
    }
}

mod read;

pub use read::{ShardReader, read_header, shard_files};
pub(crate) use read::{is_parquet, meta_and_range};
