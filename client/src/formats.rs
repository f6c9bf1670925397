//! Teacher targets as Parquet in the layouts offline-distillation trainers
//! read: Axolotl's KD plugin and DistillKit (`logitd-client dump --format`).
//!
//! One row per sequence; every per-position column has one entry per token
//! of the sequence (T), and row `t` of a target column is the teacher's
//! distribution of the *next* token, `x[t+1]`, given `x[..=t]`: logitd's
//! returned position `t`, what both trainers pair with the student's logits
//! at `t` (neither shifts the targets). Rows before the sequence's first
//! returned position hold no targets. Within a row the ids go by descending
//! teacher log p (ties by id): sampled mode's distinct ids, or top-k's k ids.
//!
//! **axolotl** (pre-tokenized KD columns; Axolotl passes a dataset with
//! `input_ids`, `attention_mask` and `labels` through as it is):
//!
//! | column | type | per row | meaning |
//! | --- | --- | --- | --- |
//! | `input_ids` | list<int64> | [T] | the sequence |
//! | `attention_mask` | list<int64> | [T] | ones |
//! | `labels` | list<int64> | [T] | `input_ids[j]` where a returned position predicts token j (j > first position), else -100 |
//! | `target_token_ids` | list<list<int64>> | [T][≤k] | ids; an empty list before the first position |
//! | `target_logprobs` | list<list<float32>> | [T][≤k] | teacher log p renormalised over the row's ids (what Axolotl's loss reads) |
//! | `target_mask` | list<list<int8>> | [T][≤k] | 1, but 0 on the last row (no next token) |
//!
//! **distillkit** (its raw offline columns; rectangular, every row of one
//! length, as its `prepacked` loader and collator need):
//!
//! | column | type | per row | meaning |
//! | --- | --- | --- | --- |
//! | `input_ids`, `attention_mask` | list<int64> | [T] | the sequence, ones |
//! | `labels` | list<int64> | [T] | `input_ids[t]` on rows with a target and a next token, else -100 (DistillKit masks row t by `labels[t] >= 0`) |
//! | `token_ids` | list<list<int64>> | [T][k] | ids, padded to k with id 0 |
//! | `top_values` | list<list<float32>> | [T][k] | teacher log p over the whole vocabulary (at T = 1, the only temperature DistillKit reads); padding -1e9 |
//!
//! Both add logitd's own columns, which the trainers ignore and the reader
//! here needs to give back the targets exactly: `first_position` (int64),
//! counts per id (`target_counts` / `counts`, list<list<uint32>>, 0 on
//! padding), `teacher_lse` (list<float32> [T], NaN before the first
//! position), for axolotl `teacher_logprobs` (the full-vocabulary log p of
//! each id), and with `--token-logprobs` `teacher_token_logprobs` and
//! `teacher_token_ranks` ([T]; NaN and 0 where there is no next token).
//!
//! Row groups hold about [`ROW_GROUP_ENTRIES`] entries (streaming readers
//! hold one at a time), snappy-compressed; the file's key-value metadata is
//! the safetensors shards' (`model_id`, `seed`, `sequence_start`, ...) plus
//! `logitd.layout`.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use arrow_array::{
    Array, ArrayRef, Int64Array, ListArray, RecordBatch, RecordBatchReader,
    builder::{Float32Builder, Int8Builder, Int64Builder, ListBuilder, UInt32Builder},
    cast::AsArray,
    types::{Float32Type, Int64Type, UInt32Type},
};
use arrow_schema::{DataType, Field};
use parquet::{
    arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::Compression,
    file::{metadata::KeyValue, properties::WriterProperties},
};

use crate::{
    SamplingMethod, TeacherTargets,
    shard::{AtomicFile, ShardError, ShardMeta, WrittenShard},
};

/// The layout `logitd-client dump` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetFormat {
    /// logitd's safetensors shards (CSR columns; the Python package and the
    /// Rust client read them).
    #[default]
    Logitd,
    /// Parquet with Axolotl's pre-tokenized KD columns.
    Axolotl,
    /// Parquet with DistillKit's raw offline columns (temperature 1, one
    /// sequence length).
    Distillkit,
}

impl TargetFormat {
    /// The name on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            TargetFormat::Logitd => "logitd",
            TargetFormat::Axolotl => "axolotl",
            TargetFormat::Distillkit => "distillkit",
        }
    }

    /// The format of a [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        [TargetFormat::Logitd, TargetFormat::Axolotl, TargetFormat::Distillkit]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// Entries (ids, padding included) per row group, roughly: a row group ends
/// after the sequence that reaches it, or [`ROW_GROUP_TOKENS`].
pub const ROW_GROUP_ENTRIES: usize = 1 << 17;
/// Tokens per row group, roughly (many short sequences).
pub const ROW_GROUP_TOKENS: usize = 1 << 15;
/// The id of DistillKit's padding entries.
pub const PAD_ID: i64 = 0;
/// The value of DistillKit's padding entries: finite (a NaN-free loss), and
/// no probability mass.
pub const PAD_VALUE: f32 = -1e9;

/// The metadata key naming the layout.
const LAYOUT_KEY: &str = "logitd.layout";

/// The file name of the Parquet shard whose first sequence is `start`.
pub fn parquet_file_name(start: u64) -> String {
    format!("targets-{start:012}.parquet")
}

/// Whether `path` is a Parquet target shard (by its name).
pub fn is_parquet_shard(path: &Path) -> bool {
    crate::shard::is_parquet(path)
}

/// Writes sequences with their targets into Parquet shards of at most
/// `max_entries` entries (whole sequences; a larger one gets a shard of its
/// own), each written atomically and recording its sequence range, like
/// [`crate::shard::ShardWriter`]. Rows stream into the open shard a row
/// group at a time: memory holds one row group, whatever the shard size.
pub struct ParquetShardWriter {
    dir: PathBuf,
    meta: ShardMeta,
    layout: TargetFormat,
    max_entries: usize,
    /// Global index of the open shard's first sequence.
    next_sequence: u64,
    /// The shard being written, once its first row group is.
    open: Option<OpenShard>,
    /// Rows of the next row group.
    group: Buffer,
    /// Entries (padding included) of the open shard, the group's included.
    shard_entries: usize,
    /// DistillKit: the length of the first sequence written, with its index.
    length: Option<(u64, usize)>,
    /// Whether the sequences carry the realised tokens' log p (all or none).
    scored: Option<bool>,
}

/// A shard being written.
struct OpenShard {
    path: PathBuf,
    writer: ArrowWriter<AtomicFile>,
    sequences: u64,
    positions: u64,
    entries: u64,
}

/// Buffered sequences: their tokens and their positions' targets, flat.
struct Buffer {
    tokens: Vec<u32>,
    /// S + 1 offsets into `tokens`.
    token_offsets: Vec<u32>,
    /// S + 1 offsets into the positions of `targets`.
    position_offsets: Vec<u32>,
    first_position: Vec<u32>,
    /// Every position of the buffered sequences as one CSR target.
    targets: TeacherTargets,
    /// Entries in the file (padding included).
    entries: usize,
}

impl Buffer {
    fn new(num_samples: u32) -> Self {
        Buffer {
            tokens: vec![],
            token_offsets: vec![0],
            position_offsets: vec![0],
            first_position: vec![],
            targets: TeacherTargets::empty(num_samples, 0),
            entries: 0,
        }
    }

    fn len(&self) -> usize {
        self.first_position.len()
    }

    /// Sequence `s`: its tokens, first position, and positions in `targets`.
    fn sequence(&self, s: usize) -> Row<'_> {
        let (t, p) = (&self.token_offsets, &self.position_offsets);
        Row {
            tokens: &self.tokens[t[s] as usize..t[s + 1] as usize],
            first: self.first_position[s] as usize,
            positions: p[s] as usize..p[s + 1] as usize,
            t: &self.targets,
        }
    }
}

/// One sequence of a [`Buffer`].
struct Row<'a> {
    tokens: &'a [u32],
    first: usize,
    /// Its positions in `t`.
    positions: std::ops::Range<usize>,
    t: &'a TeacherTargets,
}

impl ParquetShardWriter {
    /// A writer into `dir` whose first sequence is number `first_sequence`.
    /// `layout` must be a Parquet one.
    pub fn starting_at(
        dir: &Path,
        meta: ShardMeta,
        layout: TargetFormat,
        max_entries: usize,
        first_sequence: u64,
    ) -> Self {
        assert!(layout != TargetFormat::Logitd, "logitd's layout is safetensors");
        let group = Buffer::new(meta.num_samples);
        Self {
            dir: dir.to_path_buf(),
            meta,
            layout,
            max_entries: max_entries.max(1),
            next_sequence: first_sequence,
            open: None,
            group,
            shard_entries: 0,
            length: None,
            scored: None,
        }
    }

    /// Sequences of the open shard, written or buffered.
    fn sequences_in_shard(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| o.sequences) + self.group.len() as u64
    }

    /// Appends the next sequence (its tokens and targets); returns the shard
    /// completed when it had no room left for this one.
    pub fn append(
        &mut self,
        tokens: &[u32],
        t: &TeacherTargets,
    ) -> Result<Option<WrittenShard>, ShardError> {
        self.meta.check_k(t)?;
        if t.first_position as usize + t.num_positions() != tokens.len() {
            return Err(ShardError::Mismatch(format!(
                "{} tokens, but targets for positions {}..{}",
                tokens.len(),
                t.first_position,
                t.first_position as usize + t.num_positions()
            )));
        }
        let scored = !t.token_logprobs.is_empty();
        if *self.scored.get_or_insert(scored) != scored {
            return Err(ShardError::Mismatch(
                "some sequences carry token log-probabilities and others do not".into(),
            ));
        }
        let index = self.next_sequence + self.sequences_in_shard();
        if self.layout == TargetFormat::Distillkit {
            match self.length {
                None => self.length = Some((index, tokens.len())),
                Some((first, n)) if n != tokens.len() => {
                    return Err(ShardError::Mismatch(format!(
                        "{} tokens, but sequence {first} has {n}: DistillKit reads rows of one length (its `prepacked` datasets drop the others); pack the corpus to one length, or use --format axolotl",
                        tokens.len()
                    )));
                }
                Some(_) => {}
            }
        }
        let k = self.meta.num_samples as usize;
        let n = match self.layout {
            TargetFormat::Distillkit => tokens.len() * k,
            _ => t.token_ids.len(),
        };
        let written = if self.sequences_in_shard() > 0 && self.shard_entries + n > self.max_entries
        {
            self.finish_shard()?
        } else {
            None
        };
        let g = &mut self.group;
        g.tokens.extend_from_slice(tokens);
        g.token_offsets.push(g.tokens.len() as u32);
        g.targets.append(t);
        g.position_offsets.push(g.targets.num_positions() as u32);
        g.first_position.push(t.first_position);
        g.entries += n;
        self.shard_entries += n;
        if g.entries >= ROW_GROUP_ENTRIES || g.tokens.len() >= ROW_GROUP_TOKENS {
            self.write_group()?;
        }
        Ok(written)
    }

    /// Writes the buffered rows as a row group of the open shard (opening it).
    fn write_group(&mut self) -> Result<(), ShardError> {
        if self.group.len() == 0 {
            return Ok(());
        }
        let g = std::mem::replace(&mut self.group, Buffer::new(self.meta.num_samples));
        let scored = !g.targets.token_logprobs.is_empty();
        let k = self.meta.num_samples as usize;
        let rows: Vec<Row> = (0..g.len()).map(|s| g.sequence(s)).collect();
        let batch = record_batch(self.layout, k, scored, &rows)
            .map_err(|e| ShardError::Mismatch(format!("building a row group: {e}")))?;
        let open = match &mut self.open {
            Some(open) => open,
            None => {
                let path = self.dir.join(parquet_file_name(self.next_sequence));
                let mut metadata = self.meta.shard_metadata(self.next_sequence, scored);
                metadata.insert(LAYOUT_KEY.into(), self.layout.name().into());
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_key_value_metadata(Some(
                        metadata.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect(),
                    ))
                    .build();
                let file = AtomicFile::create(&path)?;
                let writer = ArrowWriter::try_new(file, batch.schema(), Some(props))
                    .map_err(|e| parquet_error(&path, e))?;
                self.open.insert(OpenShard { path, writer, sequences: 0, positions: 0, entries: 0 })
            }
        };
        open.writer.write(&batch).map_err(|e| parquet_error(&open.path, e))?;
        open.writer.flush().map_err(|e| parquet_error(&open.path, e))?;
        open.sequences += g.len() as u64;
        open.positions += g.targets.num_positions() as u64;
        open.entries += g.targets.token_ids.len() as u64;
        Ok(())
    }

    /// Writes the buffered rows, closes the open shard and moves it into place.
    fn finish_shard(&mut self) -> Result<Option<WrittenShard>, ShardError> {
        self.write_group()?;
        let Some(mut open) = self.open.take() else { return Ok(None) };
        let (start, end) = (self.next_sequence, self.next_sequence + open.sequences);
        open.writer
            .append_key_value_metadata(KeyValue::new("sequence_end".into(), end.to_string()));
        let file = open.writer.into_inner().map_err(|e| parquet_error(&open.path, e))?;
        let (bytes, sha256) = file.commit()?;
        self.next_sequence = end;
        self.shard_entries = 0;
        Ok(Some(WrittenShard {
            path: open.path,
            sequences: start..end,
            positions: open.positions,
            entries: open.entries,
            bytes,
            sha256,
        }))
    }

    /// Writes what is buffered; returns that last shard, if any.
    pub fn finish_last(mut self) -> Result<Option<WrittenShard>, ShardError> {
        self.finish_shard()
    }
}

fn parquet_error(path: &Path, e: parquet::errors::ParquetError) -> ShardError {
    ShardError::Invalid { path: path.to_path_buf(), message: format!("writing Parquet: {e}") }
}

/// Position `p`'s entries by descending log p, ties by id.
fn ranked(t: &TeacherTargets, p: usize) -> Vec<usize> {
    let mut order: Vec<usize> = t.range(p).collect();
    order.sort_by(|&a, &b| {
        t.logprobs[b].total_cmp(&t.logprobs[a]).then(t.token_ids[a].cmp(&t.token_ids[b]))
    });
    order
}

/// log Σ exp over `values`, in f64.
fn log_sum_exp(values: impl Iterator<Item = f32> + Clone) -> f64 {
    let m = values.clone().fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(v)));
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + values.map(|v| (f64::from(v) - m).exp()).sum::<f64>().ln()
}

/// Builders of the per-row [T] and [T][K] columns.
struct Builders {
    input_ids: ListBuilder<Int64Builder>,
    attention_mask: ListBuilder<Int64Builder>,
    labels: ListBuilder<Int64Builder>,
    ids: ListBuilder<ListBuilder<Int64Builder>>,
    values: ListBuilder<ListBuilder<Float32Builder>>,
    mask: ListBuilder<ListBuilder<Int8Builder>>,
    counts: ListBuilder<ListBuilder<UInt32Builder>>,
    full_logprobs: ListBuilder<ListBuilder<Float32Builder>>,
    lse: ListBuilder<Float32Builder>,
    first_position: Int64Builder,
    token_logprobs: ListBuilder<Float32Builder>,
    token_ranks: ListBuilder<UInt32Builder>,
}

impl Builders {
    fn new() -> Self {
        Self {
            input_ids: ListBuilder::new(Int64Builder::new()),
            attention_mask: ListBuilder::new(Int64Builder::new()),
            labels: ListBuilder::new(Int64Builder::new()),
            ids: ListBuilder::new(ListBuilder::new(Int64Builder::new())),
            values: ListBuilder::new(ListBuilder::new(Float32Builder::new())),
            mask: ListBuilder::new(ListBuilder::new(Int8Builder::new())),
            counts: ListBuilder::new(ListBuilder::new(UInt32Builder::new())),
            full_logprobs: ListBuilder::new(ListBuilder::new(Float32Builder::new())),
            lse: ListBuilder::new(Float32Builder::new()),
            first_position: Int64Builder::new(),
            token_logprobs: ListBuilder::new(Float32Builder::new()),
            token_ranks: ListBuilder::new(UInt32Builder::new()),
        }
    }

    /// One sequence's row.
    fn push(&mut self, layout: TargetFormat, k: usize, scored: bool, row: &Row) {
        let (tokens, t, first) = (row.tokens, row.t, row.first);
        let len = tokens.len();
        let distillkit = layout == TargetFormat::Distillkit;
        for &x in tokens {
            self.input_ids.values().append_value(i64::from(x));
            self.attention_mask.values().append_value(1);
        }
        for (j, &x) in tokens.iter().enumerate() {
            // Axolotl pairs the logits at j - 1 with labels[j]; DistillKit masks row j by labels[j].
            let trained = if distillkit { j >= first && j + 1 < len } else { j > first };
            self.labels.values().append_value(if trained { i64::from(x) } else { -100 });
        }
        for r in 0..len {
            // Row r is returned position r - first, at p in the flat targets.
            let p = r.checked_sub(first).map(|q| row.positions.start + q);
            let order = p.map(|p| ranked(t, p)).unwrap_or_default();
            let lse = p.map_or(f64::NAN, |_| log_sum_exp(order.iter().map(|&i| t.logprobs[i])));
            for &i in &order {
                self.ids.values().values().append_value(i64::from(t.token_ids[i]));
                self.counts.values().values().append_value(t.counts[i]);
                if distillkit {
                    self.values.values().values().append_value(t.logprobs[i]);
                } else {
                    let renormalised = (f64::from(t.logprobs[i]) - lse) as f32;
                    self.values.values().values().append_value(renormalised);
                    self.full_logprobs.values().values().append_value(t.logprobs[i]);
                    self.mask.values().values().append_value(i8::from(r + 1 < len));
                }
            }
            if distillkit {
                for _ in order.len()..k {
                    self.ids.values().values().append_value(PAD_ID);
                    self.counts.values().values().append_value(0);
                    self.values.values().values().append_value(PAD_VALUE);
                }
            } else {
                self.mask.values().append(true);
                self.full_logprobs.values().append(true);
            }
            self.ids.values().append(true);
            self.counts.values().append(true);
            self.values.values().append(true);
            self.lse.values().append_value(p.map_or(f32::NAN, |p| t.lse[p]));
            if scored {
                let (lp, rank) =
                    p.map_or((f32::NAN, 0), |p| (t.token_logprobs[p], t.token_ranks[p]));
                self.token_logprobs.values().append_value(lp);
                self.token_ranks.values().append_value(rank);
            }
        }
        for b in [&mut self.input_ids, &mut self.attention_mask, &mut self.labels] {
            b.append(true);
        }
        self.ids.append(true);
        self.values.append(true);
        self.counts.append(true);
        self.lse.append(true);
        self.first_position.append_value(first as i64);
        if !distillkit {
            self.mask.append(true);
            self.full_logprobs.append(true);
        }
        if scored {
            self.token_logprobs.append(true);
            self.token_ranks.append(true);
        }
    }
}

/// The record batch of `rows` in `layout`.
fn record_batch(
    layout: TargetFormat,
    k: usize,
    scored: bool,
    rows: &[Row],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mut b = Builders::new();
    for row in rows {
        b.push(layout, k, scored, row);
    }
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("input_ids", Arc::new(b.input_ids.finish())),
        ("attention_mask", Arc::new(b.attention_mask.finish())),
        ("labels", Arc::new(b.labels.finish())),
    ];
    match layout {
        TargetFormat::Distillkit => columns.extend([
            ("token_ids", Arc::new(b.ids.finish()) as ArrayRef),
            ("top_values", Arc::new(b.values.finish())),
            ("counts", Arc::new(b.counts.finish())),
        ]),
        _ => columns.extend([
            ("target_token_ids", Arc::new(b.ids.finish()) as ArrayRef),
            ("target_logprobs", Arc::new(b.values.finish())),
            ("target_mask", Arc::new(b.mask.finish())),
            ("target_counts", Arc::new(b.counts.finish())),
            ("teacher_logprobs", Arc::new(b.full_logprobs.finish())),
        ]),
    }
    columns.push(("teacher_lse", Arc::new(b.lse.finish())));
    columns.push(("first_position", Arc::new(b.first_position.finish())));
    if scored {
        columns.push(("teacher_token_logprobs", Arc::new(b.token_logprobs.finish())));
        columns.push(("teacher_token_ranks", Arc::new(b.token_ranks.finish())));
    }
    RecordBatch::try_from_iter(columns)
}

mod read;

pub use read::{read_parquet_header, read_parquet_shard};
