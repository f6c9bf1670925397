//! The manifest of one worker's part of a dump: what produced it, which
//! sequence ranges are done, in which shard, with what checksum.
//!
//! `manifest-WWWWW-of-NNNNN.json` in the output folder, rewritten atomically
//! after every shard. A rerun with the same settings resumes after the last
//! complete shard; other settings are refused, naming the difference.

use std::{
    io::Read,
    ops::Range,
    path::{Path, PathBuf},
};

use logitd_client::shard::{WrittenShard, shard_files, write_file_atomically};
use serde::{Deserialize, Serialize};

use super::DumpError;

/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;

/// An input file as the dump saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputEntry {
    /// Path as given (or as the glob expanded it).
    pub path: String,
    /// `jsonl` or `parquet`.
    pub format: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Sequences.
    pub sequences: u64,
}

/// Everything the output depends on. Not here, because the targets do not
/// depend on them: the servers, `--batch-sequences`, `--depth`, `--worker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The corpus.
    pub inputs: Vec<InputEntry>,
    /// Parquet columns.
    pub ids_column: String,
    /// Parquet first-position column.
    pub first_position_column: Option<String>,
    /// Parquet loss-mask column.
    pub loss_mask_column: Option<String>,
    /// Teacher.
    pub model_id: String,
    /// Teacher tokenizer.
    pub tokenizer_sha256: String,
    /// k (as the server resolved it).
    pub num_samples: u32,
    /// Temperature, as text.
    pub temperature: String,
    /// Seed of the run.
    pub seed: u64,
    /// `sample` or `top_k`.
    pub method: String,
    /// ValueEncoding as i32.
    pub value_encoding: i32,
    /// Entries per shard.
    pub shard_entries: u64,
    /// Workers the corpus is split across.
    pub workers: u32,
    /// The layout (`--format`); manifests from before the option read as `logitd`.
    #[serde(default = "logitd_format")]
    pub format: String,
    /// Whether the realised tokens' log p is kept (`--token-logprobs`).
    #[serde(default)]
    pub token_logprobs: bool,
}

fn logitd_format() -> String {
    "logitd".into()
}

impl Settings {
    /// The first difference between `self` (of an existing output) and `now`, in words.
    pub fn difference(&self, now: &Settings) -> Option<String> {
        if self.inputs.len() != now.inputs.len() {
            let names = |s: &Settings| s.inputs.iter().map(|i| i.path.clone()).collect::<Vec<_>>();
            return Some(format!(
                "the inputs were {:?}, now they are {:?}",
                names(self),
                names(now)
            ));
        }
        for (i, (a, b)) in self.inputs.iter().zip(&now.inputs).enumerate() {
            if a.path != b.path {
                return Some(format!("input {} was {}, now it is {}", i + 1, a.path, b.path));
            }
            if a != b {
                return Some(format!(
                    "input {} changed: it had {} bytes and {} sequences, now {} bytes and {} sequences",
                    a.path, a.bytes, a.sequences, b.bytes, b.sequences
                ));
            }
        }
        let (a, b) = (serde_json::to_value(self).ok()?, serde_json::to_value(now).ok()?);
        let flags = [
            ("ids_column", "--ids-column"),
            ("first_position_column", "--first-position-column"),
            ("loss_mask_column", "--loss-mask-column"),
            ("model_id", "the teacher's model_id"),
            ("tokenizer_sha256", "the teacher's tokenizer_sha256"),
            ("num_samples", "--num-samples (as the server resolved it)"),
            ("temperature", "--temperature"),
            ("seed", "--seed"),
            ("method", "the method (--top-k)"),
            ("value_encoding", "the value encoding"),
            ("shard_entries", "--shard-entries"),
            ("workers", "--workers"),
            ("format", "--format"),
            ("token_logprobs", "--token-logprobs"),
        ];
        flags
            .iter()
            .find(|(k, _)| a[k] != b[k])
            .map(|(k, flag)| format!("{flag} was {}, now it is {}", a[k], b[k]))
    }
}

/// A complete shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name in the output folder.
    pub file: String,
    /// Global sequence indices [start, end).
    pub sequences: [u64; 2],
    /// Input tokens of those sequences.
    pub tokens: u64,
    /// Returned positions.
    pub positions: u64,
    /// (id, count, logprob) entries.
    pub entries: u64,
    /// File size.
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: String,
}

impl ShardEntry {
    /// The entry of a shard just written.
    pub fn new(w: &WrittenShard, tokens: u64) -> Self {
        Self {
            file: w.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            sequences: [w.sequences.start, w.sequences.end],
            tokens,
            positions: w.positions,
            entries: w.entries,
            bytes: w.bytes,
            sha256: w.sha256.clone(),
        }
    }
}

/// One worker's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// What produced the output.
    pub settings: Settings,
    /// This worker's index.
    pub worker: u32,
    /// This worker's sequences [start, end).
    pub sequences: [u64; 2],
    /// Complete shards, in order.
    pub shards: Vec<ShardEntry>,
    /// Whether every sequence of the range is in a shard.
    pub complete: bool,
}

/// The manifest file name of worker `worker` of `workers`.
pub fn manifest_name(worker: u32, workers: u32) -> String {
    format!("manifest-{worker:05}-of-{workers:05}.json")
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, DumpError> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).map_err(DumpError::io("reading", dir))? {
        let p = e.map_err(DumpError::io("reading", dir))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("manifest-") && name.ends_with(".json") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

impl Manifest {
    /// Reads a manifest file.
    pub fn read(path: &Path) -> Result<Self, DumpError> {
        let text = std::fs::read(path).map_err(DumpError::io("reading", path))?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| DumpError::Manifest {
            path: path.to_path_buf(),
            message: format!("not a dump manifest ({e})"),
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(DumpError::Manifest {
                path: path.to_path_buf(),
                message: format!("manifest format {}, this dump knows {MANIFEST_FORMAT}", m.format),
            });
        }
        Ok(m)
    }

    /// Writes it atomically into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), DumpError> {
        let path = dir.join(manifest_name(self.worker, self.settings.workers));
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| DumpError::Manifest {
            path: path.clone(),
            message: format!("encoding it: {e}"),
        })?;
        text.push(b'\n');
        write_file_atomically(&path, &text)?;
        Ok(())
    }

    /// Where the next run starts: after the last complete shard.
    pub fn resume_at(&self) -> u64 {
        self.shards.last().map_or(self.sequences[0], |s| s.sequences[1])
    }
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, DumpError> {
    let mut f = std::fs::File::open(path).map_err(DumpError::io("opening", path))?;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(DumpError::io("reading", path))?;
        if n == 0 {
            let digest = sha2::Digest::finalize(hasher);
            return Ok(digest.iter().map(|b| format!("{b:02x}")).collect());
        }
        sha2::Digest::update(&mut hasher, &buf[..n]);
    }
}

/// Prepares `dir` for worker `worker` of `settings.workers` over `range`:
/// refuses other settings (of this worker's manifest or any other's), keeps
/// the complete shards its manifest lists (each must have its recorded size,
/// the last its checksum: a damaged one and every shard after it are redone),
/// removes its half-written or unlisted files, and writes the manifest.
/// Returns the manifest and notes on what was redone.
pub fn prepare(
    dir: &Path,
    settings: &Settings,
    worker: u32,
    range: Range<u64>,
) -> Result<(Manifest, Vec<String>), DumpError> {
    std::fs::create_dir_all(dir).map_err(DumpError::io("creating", dir))?;
    let manifests = manifest_files(dir)?;
    if manifests.is_empty() && !shard_files(dir)?.is_empty() {
        return Err(DumpError::Refused {
            dir: dir.to_path_buf(),
            reason: "holds target shards but no dump manifest (not written by a resumable dump); use an empty folder".into(),
        });
    }
    let own = dir.join(manifest_name(worker, settings.workers));
    for path in &manifests {
        let m = Manifest::read(path)?;
        if let Some(diff) = m.settings.difference(settings) {
            return Err(DumpError::Refused {
                dir: dir.to_path_buf(),
                reason: format!(
                    "was written with other arguments ({} says: {diff}); rerun with the same arguments to resume, or use another --out",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
        }
    }
    let mut notes = vec![];
    let mut manifest = if own.exists() {
        let mut m = Manifest::read(&own)?;
        if m.sequences != [range.start, range.end] {
            return Err(DumpError::Manifest {
                path: own,
                message: format!("worker {worker} had sequences {:?}, now {range:?}", m.sequences),
            });
        }
        notes.extend(keep_sound_shards(dir, &mut m)?);
        m
    } else {
        Manifest {
            format: MANIFEST_FORMAT,
            settings: settings.clone(),
            worker,
            sequences: [range.start, range.end],
            shards: vec![],
            complete: false,
        }
    };
    remove_unlisted(dir, &manifest, range.clone())?;
    manifest.complete = manifest.resume_at() >= range.end;
    manifest.write(dir)?;
    Ok((manifest, notes))
}

/// Drops the first shard that is missing, of another size, out of order or
/// (the last one) of another checksum, and every shard after it.
fn keep_sound_shards(dir: &Path, m: &mut Manifest) -> Result<Option<String>, DumpError> {
    let mut expected = m.sequences[0];
    let last = m.shards.len().saturating_sub(1);
    for (i, s) in m.shards.iter().enumerate() {
        let path = dir.join(&s.file);
        let size = std::fs::metadata(&path).map(|md| md.len()).ok();
        let problem = if s.sequences[0] != expected {
            Some("out of order".to_string())
        } else if size != Some(s.bytes) {
            Some(match size {
                None => "missing".into(),
                Some(n) => format!("{n} bytes instead of {}", s.bytes),
            })
        } else if i == last && file_sha256(&path)? != s.sha256 {
            Some("its checksum differs from the manifest's".into())
        } else {
            None
        };
        if let Some(problem) = problem {
            let note = format!(
                "shard {} is damaged ({problem}): redoing sequences {} to {}",
                s.file, s.sequences[0], m.sequences[1]
            );
            m.shards.truncate(i);
            m.complete = false;
            return Ok(Some(note));
        }
        expected = s.sequences[1];
    }
    Ok(None)
}

/// Removes this worker's files the manifest does not list: shards of its
/// range (from a killed run, or damaged) and half-written `.partial` files.
fn remove_unlisted(dir: &Path, m: &Manifest, range: Range<u64>) -> Result<(), DumpError> {
    let own_partial = format!("{}.partial", manifest_name(m.worker, m.settings.workers));
    for e in std::fs::read_dir(dir).map_err(DumpError::io("reading", dir))? {
        let p = e.map_err(DumpError::io("reading", dir))?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else { continue };
        if name == own_partial {
            std::fs::remove_file(&p).map_err(DumpError::io("removing", &p))?;
            continue;
        }
        let Some(rest) = name.strip_prefix("targets-") else { continue };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(start) = digits.parse::<u64>() else { continue };
        let listed = m.shards.iter().any(|s| s.file == name);
        if range.contains(&start) && !listed {
            std::fs::remove_file(&p).map_err(DumpError::io("removing", &p))?;
        }
    }
    Ok(())
}
