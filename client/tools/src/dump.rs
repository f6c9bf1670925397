//! `logitd-client dump`: the teacher targets of a whole corpus, streamed,
//! resumable and split across workers, written as logitd's safetensors
//! shards ([`logitd_client::shard`]) or as Parquet in Axolotl's or DistillKit's
//! columns ([`logitd_client::formats`]).
//!
//! - **Samples keyed by sequence index.** Sequence `n` of the corpus is sent
//!   with its own seed, [`sequence_seed`]`(seed, n)` (the proto's per-sequence
//!   `seed`), so its samples depend only on the run seed and `n`: not on
//!   `--batch-sequences`, `--depth`, the worker count, where a run resumed or
//!   how many servers answer. They equal what
//!   [`TeacherClient::sample_targets`](logitd_client::TeacherClient::sample_targets)
//!   gives for the whole corpus as one batch with that seed.
//! - **Streaming.** A reader thread parses the corpus (see [`crate::corpus`])
//!   into requests, at most `--depth` are in flight (unary calls, balanced
//!   over the servers, with retries), and a writer thread turns the answers
//!   into shards in corpus order: memory is bounded by the depth and the shard
//!   size, whatever the corpus size.
//! - **Resumable.** Shards are written atomically (a `.partial` file, synced,
//!   renamed) and recorded, with their sequence range and SHA-256, in the
//!   worker's manifest (see [`manifest`]). A rerun with the same arguments
//!   skips the complete shards and continues after the last; a damaged last
//!   shard is redone; other arguments are refused, naming the difference.
//! - **Workers.** `--worker i --workers N` takes sequences
//!   `[⌊i·S/N⌋, ⌊(i+1)·S/N⌋)` of the S in the corpus; N workers may share one
//!   output folder (shard names are their first sequence index, so they sort
//!   in corpus order) and [`ShardReader`](logitd_client::shard::ShardReader) reads it
//!   as one set.
//!
//! Errors are [`DumpError`]s: each names the file, the sequence or the
//! option; a failure after the dump started is [`DumpError::Stopped`], whose
//! source is the first failure in stream order.

pub mod manifest;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use indicatif::{ProgressBar, ProgressStyle};
use logitd_proto::v1::{
    SampleLogitsRequest, SampleLogitsResponse, SamplingMethod, Sequence, ValueEncoding,
};
use tokio::sync::mpsc;

use logitd_client::{
    ClientConfig, ClientError, SampleOptions, TargetsError, TeacherClient, TeacherTargets,
    formats::{ParquetShardWriter, TargetFormat},
    sequence_seed,
    shard::{ShardError, ShardMeta, ShardWriter, WrittenShard},
};
use manifest::{InputEntry, Manifest, Settings, ShardEntry};

use crate::corpus::{Columns, Corpus, CorpusError, Record, expand_inputs};

/// Why a dump failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The options do not fit together (nothing was read or sent); the
    /// message names the option and its value.
    #[error("{0}")]
    Options(String),
    /// The corpus could not be opened or read.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// No teacher answered, or the one that did was refused (tokenizer).
    #[error("connecting to the teacher")]
    Connect(#[source] ClientError),
    /// A request failed, after the client's retries.
    #[error("the teacher failed on the batch starting at sequence {first}")]
    Teacher {
        /// The first sequence of the batch.
        first: u64,
        /// The client's error.
        #[source]
        source: ClientError,
    },
    /// A request task ended without an answer (it panicked).
    #[error("a request task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The teacher's answer does not fit its request (sequences, positions).
    #[error("{0}")]
    Reply(String),
    /// The targets of a sequence could not be decoded.
    #[error("sequence {sequence}")]
    Targets {
        /// The sequence's index in the corpus.
        sequence: u64,
        /// What is wrong with them.
        #[source]
        source: TargetsError,
    },
    /// The targets of a sequence could not be written.
    #[error("sequence {sequence}")]
    Write {
        /// The sequence's index in the corpus.
        sequence: u64,
        /// The writer's error (naming the file).
        #[source]
        source: ShardError,
    },
    /// A shard could not be written or listed.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A file of the output folder could not be created, read or removed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done: "creating", "reading", "removing", ...
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A dump manifest is not one, is of another format, or gives this
    /// worker another range.
    #[error("{path}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The output folder holds something a resumed dump must not touch
    /// (shards without a manifest, a dump with other arguments).
    #[error("{dir} {reason}")]
    Refused {
        /// The output folder.
        dir: PathBuf,
        /// Why, naming the differing argument.
        reason: String,
    },
    /// The dump stopped after it began writing: the complete shards are
    /// kept. The source is the first failure in stream order (the input's,
    /// then the teacher's, then the disk's).
    #[error(
        "the dump stopped; the complete shards in {out} are kept, and a rerun with the same arguments resumes after them"
    )]
    Stopped {
        /// The output folder.
        out: PathBuf,
        /// What failed.
        #[source]
        source: Box<DumpError>,
    },
}

impl DumpError {
    pub(crate) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| DumpError::Io { action, path, source }
    }
}

/// What to dump, and how.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Server URIs (balanced per call).
    pub servers: Vec<String>,
    /// Input files or glob patterns, in order.
    pub inputs: Vec<String>,
    /// Parquet columns.
    pub columns: Columns,
    /// Output folder.
    pub out: PathBuf,
    /// k (0: the server default).
    pub num_samples: u32,
    /// Temperature.
    pub temperature: f32,
    /// Seed of the run.
    pub seed: u64,
    /// Top-k instead of sampling.
    pub top_k: bool,
    /// Also keep the realised next token's log p and rank at every position
    /// (shard format 2).
    pub token_logprobs: bool,
    /// Sequences per request.
    pub batch_sequences: usize,
    /// Requests in flight.
    pub depth: usize,
    /// Entries per shard.
    pub shard_entries: usize,
    /// Bearer token.
    pub auth_token: Option<String>,
    /// Refuse a server with another tokenizer.
    pub expect_tokenizer_sha256: Option<String>,
    /// This worker's index.
    pub worker: u32,
    /// Workers in all.
    pub workers: u32,
    /// The layout of the output: logitd's safetensors shards, or Parquet for
    /// Axolotl or DistillKit (see [`logitd_client::formats`]).
    pub format: TargetFormat,
}

/// What a dump did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Sequences of this worker's range in complete shards (this run and earlier ones).
    pub sequences: u64,
    /// Of which fetched by this run.
    pub sequences_this_run: u64,
    /// Input tokens of the range.
    pub tokens: u64,
    /// Returned positions.
    pub positions: u64,
    /// Entries.
    pub entries: u64,
    /// Bytes of the shards.
    pub bytes: u64,
    /// Shard files.
    pub shards: usize,
    /// Positions fetched by this run.
    pub positions_this_run: u64,
    /// Wall time of this run.
    pub wall: Duration,
    /// The teacher.
    pub model_id: String,
    /// Peak resident memory of this process (VmHWM), MiB, where /proc has it.
    pub peak_rss_mib: Option<f64>,
}

/// This process's peak resident memory (VmHWM), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

impl Summary {
    fn of(m: &Manifest) -> Self {
        let mut s = Summary { shards: m.shards.len(), ..Default::default() };
        for e in &m.shards {
            s.sequences += e.sequences[1] - e.sequences[0];
            s.tokens += e.tokens;
            s.positions += e.positions;
            s.entries += e.entries;
            s.bytes += e.bytes;
        }
        s
    }

    /// The end line.
    pub fn line(&self, out: &std::path::Path) -> String {
        let p = self.positions.max(1) as f64;
        let secs = self.wall.as_secs_f64().max(1e-9);
        format!(
            "wrote {} sequences ({} in this run), {} tokens, {} positions, {:.1} entries per position, {:.1} bytes per position on disk, {} shard(s) in {}; wall {:.1} s, {:.1} positions/s; peak RSS {} MiB; teacher {}",
            self.sequences,
            self.sequences_this_run,
            self.tokens,
            self.positions,
            self.entries as f64 / p,
            self.bytes as f64 / p,
            self.shards,
            out.display(),
            secs,
            self.positions_this_run as f64 / secs,
            self.peak_rss_mib.map_or("?".into(), |m| format!("{m:.1}")),
            self.model_id
        )
    }
}

/// The sequences worker `worker` of `workers` takes out of `total`.
pub fn worker_range(total: u64, worker: u32, workers: u32) -> std::ops::Range<u64> {
    let at = |i: u32| (u128::from(total) * u128::from(i) / u128::from(workers)) as u64;
    at(worker)..at(worker + 1)
}

/// A batch read from the corpus.
struct Batch {
    records: Vec<Record>,
}

impl Batch {
    fn request(&self, o: &DumpOptions) -> SampleLogitsRequest {
        let sequences = self
            .records
            .iter()
            .map(|r| Sequence {
                token_ids: r.tokens.clone(),
                first_position: r.first_position,
                seed: Some(sequence_seed(o.seed, r.index)),
                ..Default::default()
            })
            .collect();
        o.sample_options().request(sequences)
    }
}

impl DumpOptions {
    /// The request options of every batch: the run's k, temperature and seed,
    /// f32 values.
    fn sample_options(&self) -> SampleOptions {
        SampleOptions {
            num_samples: self.num_samples,
            temperature: Some(self.temperature),
            seed: self.seed,
            method: if self.top_k { SamplingMethod::TopK } else { SamplingMethod::Sample },
            value_encoding: ValueEncoding::F32,
            token_logprobs: self.token_logprobs,
        }
    }
}

/// Where the targets go: logitd's shards, or Parquet in a trainer's layout.
enum Sink {
    Logitd(Box<ShardWriter>),
    Parquet(Box<ParquetShardWriter>),
}

impl Sink {
    fn append(
        &mut self,
        tokens: &[u32],
        t: &TeacherTargets,
    ) -> Result<Option<WrittenShard>, ShardError> {
        match self {
            Sink::Logitd(w) => w.append(t),
            Sink::Parquet(w) => w.append(tokens, t),
        }
    }

    fn finish_last(self) -> Result<Option<WrittenShard>, ShardError> {
        match self {
            Sink::Logitd(w) => w.finish_last(),
            Sink::Parquet(w) => w.finish_last(),
        }
    }
}

/// What the writer thread receives.
enum Fetched {
    Answer(Batch, SampleLogitsResponse),
    /// Every batch was sent: write the last shard.
    Done,
}

/// Runs the dump; prints progress to stderr (when it is a terminal).
pub async fn run(o: DumpOptions) -> Result<Summary, DumpError> {
    if o.workers < 1 {
        return Err(DumpError::Options("--workers must be at least 1".into()));
    }
    if o.worker >= o.workers {
        return Err(DumpError::Options(format!(
            "--worker {} is not below --workers {}",
            o.worker, o.workers
        )));
    }
    if o.format == TargetFormat::Distillkit && o.temperature != 1.0 {
        return Err(DumpError::Options(format!(
            "--format distillkit needs --temperature 1 (DistillKit reads its values as log-probabilities at temperature 1), not {}",
            o.temperature
        )));
    }
    let started = Instant::now();
    let corpus = Corpus::open(&expand_inputs(&o.inputs)?, o.columns.clone())?;
    if corpus.is_empty() {
        return Err(DumpError::Options("the input holds no sequences".into()));
    }
    let mut config = ClientConfig::new(o.servers.clone());
    config.bearer_token = o.auth_token.clone();
    config.expect_tokenizer_sha256 = o.expect_tokenizer_sha256.clone();
    let client = TeacherClient::connect(config).await.map_err(DumpError::Connect)?;
    let info = client.model_info().clone();
    let k = if o.num_samples == 0 { info.default_num_samples } else { o.num_samples };
    let settings = settings(&o, &corpus, &info, k);
    let range = worker_range(corpus.len(), o.worker, o.workers);
    let (manifest, notes) = manifest::prepare(&o.out, &settings, o.worker, range.clone())?;
    for n in notes {
        eprintln!("logitd-client dump: {n}");
    }
    let start = manifest.resume_at();
    let meta = ShardMeta {
        model_id: info.model_id.clone(),
        tokenizer_sha256: info.tokenizer_sha256.clone(),
        num_samples: k,
        temperature: o.temperature.to_string(),
        seed: o.seed,
        method: o.sample_options().method as i32,
        value_encoding: o.sample_options().value_encoding as i32,
    };
    let writer = match o.format {
        TargetFormat::Logitd => {
            Sink::Logitd(Box::new(ShardWriter::starting_at(&o.out, meta, o.shard_entries, start)))
        }
        layout => Sink::Parquet(Box::new(ParquetShardWriter::starting_at(
            &o.out,
            meta,
            layout,
            o.shard_entries,
            start,
        ))),
    };
    let progress = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(&corpus, start..range.end)?;
    let (batch_tx, batch_rx) = mpsc::channel(o.depth.max(1));
    let reader = spawn_reader(
        corpus,
        start..range.end,
        info.vocab_size,
        o.batch_sequences,
        progress.clone(),
        batch_tx,
    );
    let (out_tx, out_rx) = mpsc::channel(o.depth.max(1));
    let out_dir = o.out.clone();
    let writer =
        std::thread::spawn(move || write_all(out_dir, writer, manifest, out_rx, bar, progress));
    let fetched = fetch_all(&client, &o, batch_rx, &out_tx).await;
    let read = reader.join().expect("the reader thread panicked");
    if fetched.is_ok() && read.is_ok() {
        let _ = out_tx.send(Fetched::Done).await;
    }
    drop(out_tx);
    let written = writer.join().expect("the writer thread panicked");
    // The first failure in stream order: the input's, then the teacher's, then the disk's.
    let manifest = read
        .and(fetched)
        .and(written)
        .map_err(|e| DumpError::Stopped { out: o.out.clone(), source: Box::new(e) })?;
    let mut summary = Summary::of(&manifest);
    summary.sequences_this_run = summary.sequences.saturating_sub(start - range.start);
    summary.positions_this_run =
        manifest.shards.iter().filter(|s| s.sequences[0] >= start).map(|s| s.positions).sum();
    summary.wall = started.elapsed();
    summary.model_id = info.model_id;
    summary.peak_rss_mib = peak_rss_mib();
    Ok(summary)
}

fn settings(
    o: &DumpOptions,
    corpus: &Corpus,
    info: &logitd_proto::v1::ModelInfo,
    k: u32,
) -> Settings {
    Settings {
        inputs: corpus
            .files()
            .iter()
            .map(|f| InputEntry {
                path: f.path.display().to_string(),
                format: f.format.name().into(),
                bytes: f.bytes,
                sequences: f.sequences,
            })
            .collect(),
        ids_column: o.columns.ids.clone(),
        first_position_column: o.columns.first_position.clone(),
        loss_mask_column: o.columns.loss_mask.clone(),
        model_id: info.model_id.clone(),
        tokenizer_sha256: info.tokenizer_sha256.clone(),
        num_samples: k,
        temperature: o.temperature.to_string(),
        seed: o.seed,
        method: if o.top_k { "top_k" } else { "sample" }.into(),
        value_encoding: o.sample_options().value_encoding as i32,
        shard_entries: o.shard_entries as u64,
        workers: o.workers,
        format: o.format.name().into(),
        token_logprobs: o.token_logprobs,
    }
}

/// The bar: input bytes (JSON lines) or rows (Parquet) of the range; the
/// message carries tokens/s.
fn progress_bar(corpus: &Corpus, range: std::ops::Range<u64>) -> Result<ProgressBar, CorpusError> {
    let (a, b) = (corpus.units_before(range.start)?, corpus.units_before(range.end)?);
    let unit =
        if corpus.progress_in_bytes() { "{bytes}/{total_bytes}" } else { "{pos}/{len} rows" };
    let bar = ProgressBar::new(b - a).with_style(
        ProgressStyle::with_template(&format!("{{bar:30}} {unit}  {{msg}}  eta {{eta}}"))
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    Ok(bar)
}

/// Reads `range` of the corpus into batches on a thread of its own.
fn spawn_reader(
    corpus: Corpus,
    range: std::ops::Range<u64>,
    vocab_size: u32,
    batch_sequences: usize,
    progress: Arc<AtomicU64>,
    tx: mpsc::Sender<Batch>,
) -> std::thread::JoinHandle<Result<(), DumpError>> {
    std::thread::spawn(move || {
        let size = batch_sequences.max(1);
        let mut records = Vec::with_capacity(size);
        for r in corpus.records(range, Some(vocab_size), progress) {
            records.push(r?);
            if records.len() == size {
                let batch =
                    Batch { records: std::mem::replace(&mut records, Vec::with_capacity(size)) };
                if tx.blocking_send(batch).is_err() {
                    return Ok(()); // the fetcher stopped; it says why
                }
            }
        }
        if !records.is_empty() {
            let _ = tx.blocking_send(Batch { records });
        }
        Ok(())
    })
}

/// Keeps `depth` requests in flight and hands the answers on in corpus order.
async fn fetch_all(
    client: &TeacherClient,
    o: &DumpOptions,
    mut batches: mpsc::Receiver<Batch>,
    out: &mpsc::Sender<Fetched>,
) -> Result<(), DumpError> {
    let depth = o.depth.max(1);
    let mut in_flight = FuturesUnordered::new();
    let mut ready: BTreeMap<u64, (Batch, SampleLogitsResponse)> = BTreeMap::new();
    let (mut sent, mut next_out, mut input_done) = (0u64, 0u64, false);
    loop {
        let room = !input_done && in_flight.len() < depth && ready.len() < depth;
        tokio::select! {
            batch = batches.recv(), if room => match batch {
                Some(batch) => {
                    let (client, request, n) = (client.clone(), batch.request(o), sent);
                    in_flight.push(tokio::spawn(async move { (n, batch, client.sample(request).await) }));
                    sent += 1;
                }
                None => input_done = true,
            },
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (n, batch, answer) = done.map_err(DumpError::Task)?;
                let first = batch.records.first().map_or(0, |r| r.index);
                let answer = answer.map_err(|source| DumpError::Teacher { first, source })?;
                ready.insert(n, (batch, answer));
                while let Some((batch, answer)) = ready.remove(&next_out) {
                    if out.send(Fetched::Answer(batch, answer)).await.is_err() {
                        return Ok(()); // the writer stopped; it says why
                    }
                    next_out += 1;
                }
            },
            else => return Ok(()),
        }
    }
}

/// Decodes the answers, checks their shape, writes the shards and the manifest.
fn write_all(
    dir: PathBuf,
    mut writer: Sink,
    mut manifest: Manifest,
    mut rx: mpsc::Receiver<Fetched>,
    bar: ProgressBar,
    progress: Arc<AtomicU64>,
) -> Result<Manifest, DumpError> {
    let started = Instant::now();
    let (mut tokens_buffered, mut tokens_run) = (0u64, 0u64);
    let record = |m: &mut Manifest, w: Option<WrittenShard>, tokens: &mut u64| {
        if let Some(w) = w {
            m.shards.push(ShardEntry::new(&w, *tokens));
            *tokens = 0;
            m.write(&dir)?;
        }
        Ok::<(), DumpError>(())
    };
    loop {
        let Some(msg) = rx.blocking_recv() else {
            bar.abandon();
            return Ok(manifest); // stopped early: the error is the fetcher's or the reader's
        };
        let (batch, answer) = match msg {
            Fetched::Answer(b, a) => (b, a),
            Fetched::Done => break,
        };
        if answer.sequences.len() != batch.records.len() {
            return Err(DumpError::Reply(format!(
                "the teacher answered {} sequences for {}",
                answer.sequences.len(),
                batch.records.len()
            )));
        }
        for (r, s) in batch.records.iter().zip(&answer.sequences) {
            let t = TeacherTargets::from_sequence(
                s,
                answer.num_samples,
                answer.value_encoding,
                answer.method,
            )
            .map_err(|source| DumpError::Targets { sequence: r.index, source })?;
            let expected = r.tokens.len() - r.first_position as usize;
            if t.num_positions() != expected {
                return Err(DumpError::Reply(format!(
                    "sequence {}: the teacher returned {} positions, not {expected}",
                    r.index,
                    t.num_positions()
                )));
            }
            let written = writer
                .append(&r.tokens, &t)
                .map_err(|source| DumpError::Write { sequence: r.index, source })?;
            record(&mut manifest, written, &mut tokens_buffered)?;
            tokens_buffered += r.tokens.len() as u64;
            tokens_run += r.tokens.len() as u64;
        }
        bar.set_position(progress.load(Ordering::Relaxed));
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.0} tokens/s", tokens_run as f64 / secs));
    }
    let last = writer.finish_last()?;
    record(&mut manifest, last, &mut tokens_buffered)?;
    manifest.complete = true;
    manifest.write(&dir)?;
    bar.finish();
    Ok(manifest)
}
