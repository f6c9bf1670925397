//! Reading target sets back: the shard files of a folder, their headers, and
//! [`ShardReader`] over one or several folders in corpus order.

use super::*;

/// The shard files of `dir` (`targets-*.safetensors`, or `targets-*.parquet`
/// in the Axolotl and DistillKit layouts), sorted by name.
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ShardError> {
    let read = std::fs::read_dir(dir)
        .map_err(|source| ShardError::Io { path: dir.to_path_buf(), source })?;
    let mut files: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("targets-")
                    && (n.ends_with(".safetensors") || n.ends_with(".parquet"))
            })
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads a target set written by [`ShardWriter`]: one folder, or several
/// (e.g. one per worker of a split dump), as one set in corpus order.
///
/// Shards that record their sequence range (`sequence_start`,
/// `sequence_end`) are ordered by it, whatever folder or name they have, and
/// must follow each other without a gap or an overlap: a missing range (a
/// worker that has not finished) is an error naming it. Older shards without
/// ranges are read in name order.
pub struct ShardReader {
    files: Vec<PathBuf>,
    meta: ShardMeta,
    sequences: Option<std::ops::Range<u64>>,
}

impl ShardReader {
    /// Opens `dir` and checks that all shards share one metadata.
    pub fn open(dir: &Path) -> Result<Self, ShardError> {
        Self::open_many(&[dir])
    }

    /// Opens the shards of all `dirs` as one set.
    pub fn open_many<P: AsRef<Path>>(dirs: &[P]) -> Result<Self, ShardError> {
        let mut files = vec![];
        for d in dirs {
            files.extend(shard_files(d.as_ref())?);
        }
        let Some(first) = files.first().cloned() else {
            let names: Vec<String> =
                dirs.iter().map(|d| d.as_ref().display().to_string()).collect();
            return Err(ShardError::Mismatch(format!(
                "{} holds no target shards",
                names.join(", ")
            )));
        };
        let (meta, _) = read_header(&first)?;
        let mut ranged = Vec::with_capacity(files.len());
        for f in files {
            let (m, range) = read_header(&f)?;
            if m != meta {
                return Err(ShardError::Mismatch(format!(
                    "{} was written by another run than {}",
                    f.display(),
                    first.display()
                )));
            }
            ranged.push((range, f));
        }
        let sequences = order_by_range(&mut ranged)?;
        Ok(Self { files: ranged.into_iter().map(|(_, f)| f).collect(), meta, sequences })
    }

    /// What produced the targets.
    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    /// The shard files, in corpus order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The global sequence indices the set holds (None for shards without ranges).
    pub fn sequences(&self) -> Option<std::ops::Range<u64>> {
        self.sequences.clone()
    }

    /// Every sequence's targets, in corpus order (one shard in memory at a time).
    pub fn iter(&self) -> impl Iterator<Item = Result<TeacherTargets, ShardError>> + '_ {
        self.files.iter().flat_map(move |f| match read_shard(f, self.meta.num_samples) {
            Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        })
    }
}

/// Sorts shards by their sequence range and checks that the ranges follow
/// each other; returns the whole range. Shards without ranges keep name order.
fn order_by_range(
    shards: &mut [(Option<std::ops::Range<u64>>, PathBuf)],
) -> Result<Option<std::ops::Range<u64>>, ShardError> {
    if shards.iter().any(|(r, _)| r.is_none()) {
        if let Some((_, f)) = shards.iter().find(|(r, _)| r.is_some()) {
            return Err(ShardError::Mismatch(format!(
                "{} records its sequence range but other shards beside it do not",
                f.display()
            )));
        }
        return Ok(None);
    }
    shards.sort_by_key(|(r, _)| r.as_ref().map(|r| r.start));
    for w in shards.windows(2) {
        let (a, b) = (w[0].0.clone().unwrap_or_default(), w[1].0.clone().unwrap_or_default());
        if b.start > a.end {
            return Err(ShardError::Mismatch(format!(
                "sequences {}..{} are missing (between {} and {}; has every worker finished?)",
                a.end,
                b.start,
                w[0].1.display(),
                w[1].1.display()
            )));
        }
        if b.start < a.end {
            return Err(ShardError::Mismatch(format!(
                "{} and {} overlap (sequences {}..{} and {}..{})",
                w[0].1.display(),
                w[1].1.display(),
                a.start,
                a.end,
                b.start,
                b.end
            )));
        }
    }
    let start = shards.first().and_then(|(r, _)| r.as_ref().map(|r| r.start));
    let end = shards.last().and_then(|(r, _)| r.as_ref().map(|r| r.end));
    Ok(start.zip(end).map(|(s, e)| s..e))
}

/// Whether `path` is a Parquet target shard (by its name).
pub(crate) fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

/// A Parquet shard met by a build without the `parquet` feature.
#[cfg(not(feature = "parquet"))]
fn without_parquet(path: &Path) -> ShardError {
    ShardError::Invalid {
        path: path.to_path_buf(),
        message: "a Parquet shard (Axolotl or DistillKit layout); reading it needs \
                  logitd-client's `parquet` feature, which this build leaves out"
            .into(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ShardError> {
    std::fs::read(path).map_err(|source| ShardError::Io { path: path.to_path_buf(), source })
}

/// The metadata of a shard and its sequence range, from its header only.
pub fn read_header(path: &Path) -> Result<(ShardMeta, Option<std::ops::Range<u64>>), ShardError> {
    if is_parquet(path) {
        #[cfg(feature = "parquet")]
        {
            let (meta, range, _) = crate::formats::read_parquet_header(path)?;
            return Ok((meta, range));
        }
        #[cfg(not(feature = "parquet"))]
        return Err(without_parquet(path));
    }
    use std::io::Read as _;
    let io = |source| ShardError::Io { path: path.to_path_buf(), source };
    let invalid = |message: String| ShardError::Invalid { path: path.to_path_buf(), message };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| invalid("too short for a safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        return Err(invalid(format!("header length {n} is not plausible")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| invalid("the header is cut short".into()))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("the header is not JSON: {e}")))?;
    let map: HashMap<String, String> = header
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .ok_or_else(|| invalid("no string metadata in the header".into()))?;
    meta_and_range(&map, path)
}

/// The metadata and sequence range a shard's string metadata records.
pub(crate) fn meta_and_range(
    map: &HashMap<String, String>,
    path: &Path,
) -> Result<(ShardMeta, Option<std::ops::Range<u64>>), ShardError> {
    let invalid = |message: String| ShardError::Invalid { path: path.to_path_buf(), message };
    let meta = ShardMeta::from_map(map, path)?;
    let num = |k: &str| -> Result<Option<u64>, ShardError> {
        map.get(k)
            .map(|v| v.parse::<u64>().map_err(|e| invalid(format!("metadata `{k}`: {e}"))))
            .transpose()
    };
    let range = match (num("sequence_start")?, num("sequence_end")?) {
        (Some(a), Some(b)) if a <= b => Some(a..b),
        (None, None) => None,
        _ => return Err(invalid("metadata `sequence_start`/`sequence_end` do not fit".into())),
    };
    Ok((meta, range))
}

fn read_shard(path: &Path, num_samples: u32) -> Result<Vec<TeacherTargets>, ShardError> {
    if is_parquet(path) {
        #[cfg(feature = "parquet")]
        return crate::formats::read_parquet_shard(path, num_samples);
        #[cfg(not(feature = "parquet"))]
        return Err(without_parquet(path));
    }
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
    let has = |name: &str| st.tensor(name).is_ok();
    let optional_f = |name: &str| if has(name) { f(name) } else { Ok(vec![]) };
    let optional_u = |name: &str| if has(name) { u(name) } else { Ok(vec![]) };
    let (token_logprobs, token_ranks) = (optional_f("token_logprobs")?, optional_u("token_ranks")?);
    let (cand_off, cand_lp) = (optional_u("candidate_offsets")?, optional_f("candidate_logprobs")?);
    let positions = lse.len();
    if (!token_logprobs.is_empty()
        && (token_logprobs.len() != positions || token_ranks.len() != positions))
        || (!cand_off.is_empty() && cand_off.len() != positions + 1)
    {
        return Err(invalid("the on-policy columns do not fit the positions".into()));
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
        let (candidate_offsets, candidate_logprobs) = if cand_off.is_empty() {
            (vec![], vec![])
        } else {
            let (c0, c1) = (cand_off[p0] as usize, cand_off[p1] as usize);
            if c0 > c1 || c1 > cand_lp.len() {
                return Err(invalid(format!("sequence {s}: candidates {c0}..{c1} out of range")));
            }
            (csr::rebased(&cand_off, p0..p1), cand_lp[c0..c1].to_vec())
        };
        let per_position = |v: &[f32]| if v.is_empty() { vec![] } else { v[p0..p1].to_vec() };
        let t = TeacherTargets {
            num_samples,
            first_position: first[s],
            offsets: csr::rebased(&offsets, p0..p1),
            token_ids: ids[e0..e1].to_vec(),
            counts: counts[e0..e1].to_vec(),
            logprobs: logprobs[e0..e1].to_vec(),
            lse: lse[p0..p1].to_vec(),
            token_logprobs: per_position(&token_logprobs),
            token_ranks: if token_ranks.is_empty() { vec![] } else { token_ranks[p0..p1].to_vec() },
            candidate_offsets,
            candidate_logprobs,
        };
        t.validate().map_err(|e| invalid(format!("sequence {s}: {e}")))?;
        out.push(t);
    }
    Ok(out)
}
