//! Token corpora, the input of `logitd-client dump` and `logitd-bench`, read
//! as a stream: memory stays bounded whatever the corpus size.
//!
//! - **JSON lines** (any name but `*.parquet`): one sequence per line, either an
//!   array of token ids or an object `{"token_ids": [...], "first_position": N}`
//!   (`input_ids` is accepted for `token_ids`; `first_position` is optional,
//!   default 0; other keys are ignored). Blank lines are skipped. Lines are
//!   parsed straight into ids.
//! - **Parquet** (`*.parquet`): a list-of-integers column (`input_ids` by
//!   default, as Hugging Face `datasets` writes tokenised corpora), read a few
//!   hundred rows at a time by row group, with an optional integer
//!   first-position column or an optional loss-mask column (list of integers
//!   or booleans, one per token: the first returned position is the first
//!   non-zero one).
//!
//! Several files (or glob patterns, each expanded in name order) are one
//! corpus, in the order given. Sequence `n` is the n-th sequence of that
//! corpus, counted from 0 over all files (blank lines do not count). Opening a
//! corpus counts its sequences (a scan of the JSON lines, the metadata of the
//! Parquet files) so that any range of sequences can be read without
//! reading what comes before it.
//!
//! Errors ([`CorpusError`]) name the file and the line, or the row group and
//! row, and say what is wrong: not an array, a negative id, an id not below the
//! vocabulary size, an empty sequence, a first position not below the sequence
//! length, a missing column, a file that is not Parquet.

mod jsonl;
mod parquet;

use std::{
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

/// Why a corpus could not be opened or read. Every variant names the file
/// (or the glob pattern) and, for its content, where in it.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// A glob pattern is malformed, or a path it matched cannot be read.
    #[error("input pattern {pattern:?}: {message}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong.
        message: String,
    },
    /// A glob pattern matches no file.
    #[error("input pattern {pattern:?} matches no file")]
    NoMatch {
        /// The pattern as given.
        pattern: String,
    },
    /// The file could not be opened, read or sought.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done: "opening", "reading", "seeking".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line of a JSON lines file is not a sequence (not JSON, not an
    /// array of integers or an object with `token_ids`).
    #[error("{path}:{line}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The line, 1-based.
        line: u64,
        /// serde_json's description.
        source: serde_json::Error,
    },
    /// A `*.parquet` file is not Parquet.
    #[error("{path}: not a Parquet file ({source})")]
    NotParquet {
        /// The file.
        path: PathBuf,
        /// The Parquet reader's description.
        source: ::parquet::errors::ParquetError,
    },
    /// A Parquet file lacks a column, has one of the wrong type, or a row
    /// group could not be decoded.
    #[error("{path}: {message}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the column or row group.
        message: String,
    },
    /// A sequence is not valid: a negative id, an id not below the
    /// vocabulary size, an empty sequence, a first position outside it, a
    /// null value, a loss mask that does not fit.
    #[error("{path}: {location} (sequence {index}): {problem}")]
    Sequence {
        /// The file.
        path: PathBuf,
        /// Where in the file: `line N`, or `row group G, row R`.
        location: String,
        /// The sequence's index in the corpus.
        index: u64,
        /// What is wrong, naming the value.
        problem: String,
    },
    /// The file holds fewer sequences than when the corpus was opened: it
    /// changed under the reader.
    #[error("{path}: {message}")]
    Changed {
        /// The file.
        path: PathBuf,
        /// What was expected.
        message: String,
    },
}

impl CorpusError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| CorpusError::Io { action, path, source }
    }
}

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON lines.
    Jsonl,
    /// Parquet.
    Parquet,
}

impl Format {
    /// The format a file name says (`.parquet`: Parquet, anything else: JSON lines).
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("parquet") => Format::Parquet,
            _ => Format::Jsonl,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
        }
    }
}

/// Which Parquet columns hold what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// The token ids (a list of integers per row).
    pub ids: String,
    /// An integer column: the first returned position of each row.
    pub first_position: Option<String>,
    /// A list column aligned with the ids: the first non-zero entry is the
    /// first returned position.
    pub loss_mask: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Self { ids: "input_ids".into(), first_position: None, loss_mask: None }
    }
}

/// One input file, counted.
#[derive(Debug, Clone)]
pub struct InputFile {
    /// Its path, as given or as the glob expanded it.
    pub path: PathBuf,
    /// How it is read.
    pub format: Format,
    /// Its size.
    pub bytes: u64,
    /// Its sequences.
    pub sequences: u64,
    /// JSON lines: (byte offset, line number) of every `CHECKPOINT`-th sequence.
    checkpoints: Vec<(u64, u64)>,
}

/// JSON lines: a seek point every this many sequences.
const CHECKPOINT: u64 = 1 << 14;

/// One sequence of a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its index in the corpus.
    pub index: u64,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// First returned position.
    pub first_position: u32,
}

/// A corpus: files in order, each counted.
#[derive(Debug, Clone)]
pub struct Corpus {
    files: Vec<InputFile>,
    columns: Columns,
}

/// Expands each pattern (a path, or a glob with `*`, `?` or `[`) in name
/// order; a pattern that matches nothing is an error.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<PathBuf>, CorpusError> {
    let mut out = vec![];
    for p in patterns {
        if !p.contains(['*', '?', '[']) {
            out.push(PathBuf::from(p));
            continue;
        }
        let pattern = |message: String| CorpusError::Pattern { pattern: p.clone(), message };
        let mut matched: Vec<PathBuf> = glob::glob(p)
            .map_err(|e| pattern(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| pattern(e.to_string()))?;
        matched.sort();
        if matched.is_empty() {
            return Err(CorpusError::NoMatch { pattern: p.clone() });
        }
        out.extend(matched);
    }
    Ok(out)
}

impl Corpus {
    /// Opens and counts `paths` (see [`expand_inputs`]), each read as
    /// [`Format::of`] its name says.
    pub fn open(paths: &[PathBuf], columns: Columns) -> Result<Self, CorpusError> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let format = Format::of(path);
            let bytes = std::fs::metadata(path).map_err(CorpusError::io("opening", path))?.len();
            let (sequences, checkpoints) = match format {
                Format::Jsonl => jsonl::count(path, CHECKPOINT)?,
                Format::Parquet => (parquet::count(path, &columns)?, vec![]),
            };
            files.push(InputFile { path: path.clone(), format, bytes, sequences, checkpoints });
        }
        Ok(Self { files, columns })
    }

    /// The files, in order.
    pub fn files(&self) -> &[InputFile] {
        &self.files
    }

    /// The columns read from Parquet files.
    pub fn columns(&self) -> &Columns {
        &self.columns
    }

    /// Sequences in all.
    pub fn len(&self) -> u64 {
        self.files.iter().map(|f| f.sequences).sum()
    }

    /// Whether there is no sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether progress is counted in input bytes (all files are JSON lines)
    /// rather than in sequences (Parquet rows, from the metadata).
    pub fn progress_in_bytes(&self) -> bool {
        self.files.iter().all(|f| f.format == Format::Jsonl)
    }

    /// Which file holds sequence `n`, and its index there.
    fn locate(&self, n: u64) -> (usize, u64) {
        let mut base = 0;
        for (i, f) in self.files.iter().enumerate() {
            if n < base + f.sequences {
                return (i, n - base);
            }
            base += f.sequences;
        }
        (self.files.len(), 0)
    }

    /// Progress units (see [`progress_in_bytes`](Self::progress_in_bytes)) from
    /// the start of the corpus to sequence `n`.
    pub fn units_before(&self, n: u64) -> Result<u64, CorpusError> {
        if !self.progress_in_bytes() {
            return Ok(n.min(self.len()));
        }
        let (file, local) = self.locate(n);
        let before: u64 = self.files[..file].iter().map(|f| f.bytes).sum();
        match self.files.get(file) {
            Some(f) => Ok(before + jsonl::Reader::at(f, local, CHECKPOINT)?.offset()),
            None => Ok(before),
        }
    }

    /// Reads sequences `range` in order; ids at or above `vocab_size` (when
    /// given) are errors. `progress` is advanced by the units read.
    pub fn records(
        &self,
        range: Range<u64>,
        vocab_size: Option<u32>,
        progress: Arc<AtomicU64>,
    ) -> Records {
        let (file, local) = self.locate(range.start);
        Records {
            corpus: self.clone(),
            next: range.start,
            end: range.end.min(self.len()),
            file,
            local,
            source: None,
            vocab_size,
            progress,
        }
    }
}

enum Source {
    Jsonl(jsonl::Reader),
    Parquet(parquet::Reader),
}

/// A raw sequence as a reader found it, with where it was.
pub(crate) struct Raw {
    pub(crate) ids: Vec<i64>,
    pub(crate) first_position: i64,
    pub(crate) location: String,
    /// What the reader found wrong with it, if anything.
    pub(crate) problem: Option<String>,
}

/// Sequences of a corpus in order (see [`Corpus::records`]).
pub struct Records {
    corpus: Corpus,
    next: u64,
    end: u64,
    file: usize,
    local: u64,
    source: Option<Source>,
    vocab_size: Option<u32>,
    progress: Arc<AtomicU64>,
}

impl Records {
    fn open_source(&mut self) -> Result<(), CorpusError> {
        let f = &self.corpus.files[self.file];
        self.source = Some(match f.format {
            Format::Jsonl => Source::Jsonl(jsonl::Reader::at(f, self.local, CHECKPOINT)?),
            Format::Parquet => {
                Source::Parquet(parquet::Reader::at(&f.path, &self.corpus.columns, self.local)?)
            }
        });
        Ok(())
    }

    fn read(&mut self) -> Result<Option<Record>, CorpusError> {
        if self.next >= self.end {
            return Ok(None);
        }
        while self.local >= self.corpus.files[self.file].sequences {
            self.file += 1;
            self.local = 0;
            self.source = None;
        }
        if self.source.is_none() {
            self.open_source()?;
        }
        let in_bytes = self.corpus.progress_in_bytes();
        let raw = match self.source.as_mut().expect("opened") {
            Source::Jsonl(r) => {
                let before = r.offset();
                let raw = r.next()?;
                if in_bytes {
                    self.progress.fetch_add(r.offset() - before, Ordering::Relaxed);
                }
                raw
            }
            Source::Parquet(r) => r.next()?,
        };
        let path = &self.corpus.files[self.file].path;
        let Some(raw) = raw else {
            return Err(CorpusError::Changed {
                path: path.clone(),
                message: format!("ended before its counted {} sequences", self.local),
            });
        };
        if !in_bytes {
            self.progress.fetch_add(1, Ordering::Relaxed);
        }
        let (location, index) = (raw.location.clone(), self.next);
        let record = check(raw, index, self.vocab_size).map_err(|problem| {
            CorpusError::Sequence { path: path.clone(), location, index, problem }
        })?;
        self.next += 1;
        self.local += 1;
        Ok(Some(record))
    }
}

/// Checks a raw sequence: ids non-negative and below the vocabulary, not
/// empty, the first position inside it; the error says what is wrong.
fn check(raw: Raw, index: u64, vocab_size: Option<u32>) -> Result<Record, String> {
    if let Some(problem) = raw.problem {
        return Err(problem);
    }
    if raw.ids.is_empty() {
        return Err("the sequence is empty".into());
    }
    let limit = vocab_size.map_or(i64::from(u32::MAX), i64::from);
    let mut tokens = Vec::with_capacity(raw.ids.len());
    for (i, &id) in raw.ids.iter().enumerate() {
        if id < 0 {
            return Err(format!("token id {id} (at index {i}) is negative"));
        }
        if id >= limit {
            return Err(format!(
                "token id {id} (at index {i}) is not below the vocabulary size {}",
                vocab_size.map_or(u64::from(u32::MAX), u64::from)
            ));
        }
        tokens.push(id as u32);
    }
    let first = raw.first_position;
    if first < 0 || first >= tokens.len() as i64 {
        return Err(format!(
            "first_position {first} is not a position of the sequence (0..{})",
            tokens.len()
        ));
    }
    Ok(Record { index, tokens, first_position: first as u32 })
}

impl Iterator for Records {
    type Item = Result<Record, CorpusError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.read() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.next = self.end; // stop after an error
                Some(Err(e))
            }
        }
    }
}

/// Reads a whole corpus file into memory: per sequence, the token ids and the
/// first position to return (for `logitd-bench`'s pool of sequences). Errors
/// name the file and line.
pub fn read_corpus(path: &Path) -> Result<Vec<(Vec<u32>, u32)>, CorpusError> {
    let corpus = Corpus::open(&[path.to_path_buf()], Columns::default())?;
    corpus
        .records(0..corpus.len(), None, Arc::default())
        .map(|r| r.map(|r| (r.tokens, r.first_position)))
        .collect()
}
