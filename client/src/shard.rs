//! Teacher targets on disk: write the replies for a corpus once, train several
//! students from them.
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
//! The safetensors metadata carries `logitd.format` (= 1), `model_id`,
//! `tokenizer_sha256`, `num_samples`, `temperature`, `seed`, `method` and
//! `value_encoding` (what the server reported), so a reader can refuse targets
//! from another teacher. Values are stored exactly as decoded (f32), so a read
//! gives back bit-identical targets.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::TeacherTargets;

/// Format version written and accepted.
pub const FORMAT_VERSION: &str = "1";

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
        if version != FORMAT_VERSION {
            return Err(invalid(format!(
                "format version {version}, this reader knows {FORMAT_VERSION}"
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

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes targets into shards of at most `max_entries` (id, count, logprob)
/// entries each (whole sequences; a larger sequence gets a shard of its own).
pub struct ShardWriter {
    dir: PathBuf,
    meta: ShardMeta,
    max_entries: usize,
    columns: Columns,
    written: Vec<PathBuf>,
}

impl ShardWriter {
    /// Creates `dir` (which must not hold shards yet).
    pub fn create(dir: &Path, meta: ShardMeta, max_entries: usize) -> Result<Self, ShardError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| ShardError::Io { path: dir.to_path_buf(), source })?;
        if !shard_files(dir)?.is_empty() {
            return Err(ShardError::Mismatch(format!(
                "{} already holds target shards",
                dir.display()
            )));
        }
        let columns = Columns::new(meta.num_samples);
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            max_entries: max_entries.max(1),
            columns,
            written: vec![],
        })
    }

    /// Appends one sequence's targets.
    pub fn append(&mut self, t: &TeacherTargets) -> Result<(), ShardError> {
        if t.num_samples != self.meta.num_samples {
            return Err(ShardError::Mismatch(format!(
                "targets with k = {} do not belong in a set written with k = {}",
                t.num_samples, self.meta.num_samples
            )));
        }
        let buffered = self.columns.positions.token_ids.len();
        if buffered > 0 && buffered + t.token_ids.len() > self.max_entries {
            self.flush()?;
        }
        let c = &mut self.columns;
        c.positions.append(t);
        c.first_position.push(t.first_position);
        c.sequence_offsets.push(c.positions.lse.len() as u32);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ShardError> {
        if self.columns.first_position.is_empty() {
            return Ok(());
        }
        let c = std::mem::replace(&mut self.columns, Columns::new(self.meta.num_samples));
        let t = &c.positions;
        let path = self.dir.join(format!("targets-{:05}.safetensors", self.written.len()));
        let data: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                "sequence_offsets",
                Dtype::U32,
                vec![c.sequence_offsets.len()],
                u32_bytes(&c.sequence_offsets),
            ),
            (
                "first_position",
                Dtype::U32,
                vec![c.first_position.len()],
                u32_bytes(&c.first_position),
            ),
            ("offsets", Dtype::U32, vec![t.offsets.len()], u32_bytes(&t.offsets)),
            ("token_ids", Dtype::U32, vec![t.token_ids.len()], u32_bytes(&t.token_ids)),
            ("counts", Dtype::U32, vec![t.counts.len()], u32_bytes(&t.counts)),
            ("logprobs", Dtype::F32, vec![t.logprobs.len()], f32_bytes(&t.logprobs)),
            ("lse", Dtype::F32, vec![t.lse.len()], f32_bytes(&t.lse)),
        ];
        let views = data
            .iter()
            .map(|(n, d, s, b)| {
                Ok((*n, TensorView::new(*d, s.clone(), b).map_err(|e| self.invalid(&path, e))?))
            })
            .collect::<Result<Vec<_>, ShardError>>()?;
        let tmp = path.with_extension("partial");
        safetensors::serialize_to_file(views, Some(self.meta.to_map()), &tmp)
            .map_err(|e| self.invalid(&tmp, e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|source| ShardError::Io { path: path.clone(), source })?;
        self.written.push(path);
        Ok(())
    }

    fn invalid(&self, path: &Path, e: impl std::fmt::Display) -> ShardError {
        ShardError::Invalid { path: path.to_path_buf(), message: e.to_string() }
    }

    /// Writes what is buffered and returns the shard files.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, ShardError> {
        self.flush()?;
        Ok(self.written)
    }
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ShardError> {
    let read = std::fs::read_dir(dir)
        .map_err(|source| ShardError::Io { path: dir.to_path_buf(), source })?;
    let mut files: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("targets-") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads a target set written by [`ShardWriter`].
pub struct ShardReader {
    files: Vec<PathBuf>,
    meta: ShardMeta,
}

impl ShardReader {
    /// Opens `dir` and checks that all shards share one metadata.
    pub fn open(dir: &Path) -> Result<Self, ShardError> {
        let files = shard_files(dir)?;
        let Some(first) = files.first() else {
            return Err(ShardError::Mismatch(format!("{} holds no target shards", dir.display())));
        };
        let meta = read_meta(first)?;
        for f in &files[1..] {
            if read_meta(f)? != meta {
                return Err(ShardError::Mismatch(format!(
                    "{} was written by another run than {}",
                    f.display(),
                    first.display()
                )));
            }
        }
        Ok(Self { files, meta })
    }

    /// What produced the targets.
    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    /// The shard files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every sequence's targets, in the order written (one shard in memory at a time).
    pub fn iter(&self) -> impl Iterator<Item = Result<TeacherTargets, ShardError>> + '_ {
        self.files.iter().flat_map(move |f| match read_shard(f, self.meta.num_samples) {
            Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ShardError> {
    std::fs::read(path).map_err(|source| ShardError::Io { path: path.to_path_buf(), source })
}

fn read_meta(path: &Path) -> Result<ShardMeta, ShardError> {
    let bytes = read_file(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| ShardError::Invalid { path: path.to_path_buf(), message: e.to_string() })?;
    let map = meta.metadata().clone().unwrap_or_default();
    ShardMeta::from_map(&map, path)
}

fn read_shard(path: &Path, num_samples: u32) -> Result<Vec<TeacherTargets>, ShardError> {
    let invalid = |message: String| ShardError::Invalid { path: path.to_path_buf(), message };
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let column = |name: &str, dtype: Dtype| -> Result<Vec<[u8; 4]>, ShardError> {
        let t = st.tensor(name).map_err(|e| invalid(format!("tensor `{name}`: {e}")))?;
        if t.dtype() != dtype || t.shape().len() != 1 {
            return Err(invalid(format!(
                "tensor `{name}` is {:?} {:?}, expected 1-D {dtype:?}",
                t.dtype(),
                t.shape()
            )));
        }
        Ok(t.data().chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect())
    };
    let u = |name: &str| -> Result<Vec<u32>, ShardError> {
        Ok(column(name, Dtype::U32)?.into_iter().map(u32::from_le_bytes).collect())
    };
    let f = |name: &str| -> Result<Vec<f32>, ShardError> {
        Ok(column(name, Dtype::F32)?.into_iter().map(f32::from_le_bytes).collect())
    };
    let (seq_off, first, offsets) = (u("sequence_offsets")?, u("first_position")?, u("offsets")?);
    let (ids, counts, logprobs, lse) = (u("token_ids")?, u("counts")?, f("logprobs")?, f("lse")?);
    if seq_off.len() != first.len() + 1 || offsets.len() != lse.len() + 1 {
        return Err(invalid("column lengths do not fit together".into()));
    }
    let mut out = Vec::with_capacity(first.len());
    for s in 0..first.len() {
        let (p0, p1) = (seq_off[s] as usize, seq_off[s + 1] as usize);
        if p0 > p1 || p1 >= offsets.len() {
            return Err(invalid(format!("sequence {s}: positions {p0}..{p1} out of range")));
        }
        let (e0, e1) = (offsets[p0] as usize, offsets[p1] as usize);
        if e0 > e1 || e1 > ids.len() || e1 > counts.len() || e1 > logprobs.len() {
            return Err(invalid(format!("sequence {s}: entries {e0}..{e1} out of range")));
        }
        let t = TeacherTargets {
            num_samples,
            first_position: first[s],
            offsets: offsets[p0..=p1].iter().map(|o| o - offsets[p0]).collect(),
            token_ids: ids[e0..e1].to_vec(),
            counts: counts[e0..e1].to_vec(),
            logprobs: logprobs[e0..e1].to_vec(),
            lse: lse[p0..p1].to_vec(),
        };
        t.validate().map_err(|e| invalid(format!("sequence {s}: {e}")))?;
        out.push(t);
    }
    Ok(out)
}
