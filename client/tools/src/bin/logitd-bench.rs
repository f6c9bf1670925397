//! `logitd-bench`: a closed-loop load generator for a logitd server.
//!
//! N callers each send a request of a fixed shape (sequences × length tokens, k
//! draws), wait for its answer (unary), or keep `--depth` requests in flight on
//! one stream each (streaming), and send the next, for a duration or a number
//! of requests. Calls are never retried: every failure is counted by status.
//!
//! ```text
//! logitd-bench --server http://127.0.0.1:50051 --concurrency 2 --sequences 4 --length 128 \
//!     --duration-s 30 [--mode stream --depth 2] [--input corpus.jsonl] [--json out.json]
//! ```
//!
//! It prints a table (throughput in returned positions/s, latency p50/p90/p99,
//! response bytes per position, distinct ids per position, errors by status),
//! and with `--json PATH` (`-` for stdout) the same as one JSON object.
//! Bytes are the encoded protobuf response plus the 5-byte gRPC message header
//! (no compression is used), i.e. what the message costs on the wire before
//! HTTP/2 framing.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use logitd_client::{ClientConfig, RawTeacherClient, SampleOptions, TeacherClient, sequence_seed};
use logitd_client_tools::corpus::read_corpus;
use logitd_proto::v1::{
    ModelInfo, SampleLogitsRequest, SampleLogitsResponse, SamplingMethod, Sequence, ValueEncoding,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

/// Closed-loop load generator for a logitd server.
///
/// N callers each send a request of a fixed shape (sequences × length tokens,
/// k draws) and wait for its answer (unary), or keep `--depth` requests in
/// flight on one stream each (`--mode stream`), for `--duration-s` seconds or
/// `--requests` requests. Calls are never retried; failures are counted by
/// status. Prints positions/s, latency p50/p90/p99, response bytes and distinct
/// ids per position, and errors; `--json PATH` (`-`: stdout) writes the same as
/// JSON.
#[derive(Parser, Debug, Clone)]
#[command(name = "logitd-bench", version)]
struct Args {
    /// Server URI(s), comma-separated (several are balanced per call).
    #[arg(long, env = "LOGITD_SERVER", value_delimiter = ',', required = true)]
    server: Vec<String>,
    /// Concurrent callers.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Unary calls, or one SampleLogitsStream per caller.
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    mode: Mode,
    /// Requests in flight on each caller's stream (stream mode).
    #[arg(long, default_value_t = 2)]
    depth: usize,
    /// Sequences per request.
    #[arg(long, default_value_t = 4)]
    sequences: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    length: usize,
    /// First returned position of each sequence (earlier ones are context).
    #[arg(long, default_value_t = 0)]
    first_position: u32,
    /// Draws per position, k.
    #[arg(long, default_value_t = 256)]
    num_samples: u32,
    /// Softmax temperature (default: the server's, 1).
    #[arg(long)]
    temperature: Option<f32>,
    /// Top-k instead of sampling.
    #[arg(long)]
    top_k: bool,
    /// How log-probabilities are sent.
    #[arg(long, value_enum, default_value_t = Encoding::F32)]
    value_encoding: Encoding,
    /// Measure for this long (callers stop sending then; answers in flight are awaited).
    #[arg(long, conflicts_with = "requests")]
    duration_s: Option<f64>,
    /// Measure this many requests in all (default 100 when no duration is given).
    #[arg(long)]
    requests: Option<u64>,
    /// Requests sent before measuring, not counted.
    #[arg(long, default_value_t = 0)]
    warmup_requests: u64,
    /// Token sequences (JSON lines: an array of ids, or {"token_ids": [...]}); each
    /// contributes its first `--length` tokens (shorter ones are skipped) and
    /// requests cycle through them. Default: deterministic synthetic ids.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Seed; request r uses a seed derived from it and r.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Deadline of each call.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// Bearer token for the server.
    #[arg(long, env = "LOGITD_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Write the results as JSON to this file (`-`: stdout, instead of the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// A label copied into the JSON.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Unary,
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Encoding {
    F32,
    F16,
    Bf16,
}

impl Encoding {
    fn proto(self) -> ValueEncoding {
        match self {
            Encoding::F32 => ValueEncoding::F32,
            Encoding::F16 => ValueEncoding::F16,
            Encoding::Bf16 => ValueEncoding::Bf16,
        }
    }
}

/// The pool of sequences requests are made of, each exactly `length` tokens.
fn sequence_pool(args: &Args, vocab: u32) -> anyhow::Result<Vec<Vec<u32>>> {
    anyhow::ensure!(args.length > 0, "--length must be at least 1");
    anyhow::ensure!(args.sequences > 0, "--sequences must be at least 1");
    anyhow::ensure!(
        (args.first_position as usize) < args.length,
        "--first-position must be below --length"
    );
    let Some(path) = &args.input else {
        // Deterministic synthetic ids (the formula of the teacher_forward example).
        let range = u64::from(vocab.clamp(1, 30_000));
        return Ok((0..64u64.max(args.sequences as u64))
            .map(|s| {
                (0..args.length as u64).map(|p| ((s * 7919 + p * 104_729) % range) as u32).collect()
            })
            .collect());
    };
    let pool: Vec<Vec<u32>> = read_corpus(path)?
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| t.len() >= args.length)
        .map(|mut t| {
            t.truncate(args.length);
            t
        })
        .collect();
    if pool.is_empty() {
        bail!("{} holds no sequence of at least {} tokens", path.display(), args.length);
    }
    Ok(pool)
}

/// Builds request number `r`.
struct Requests {
    pool: Vec<Vec<u32>>,
    args: Args,
}

impl Requests {
    fn get(&self, r: u64) -> SampleLogitsRequest {
        let s = self.args.sequences as u64;
        let n = self.pool.len() as u64;
        let sequences = (0..s)
            .map(|i| Sequence {
                token_ids: self.pool[((r * s + i) % n) as usize].clone(),
                first_position: self.args.first_position,
                seed: None,
                ..Default::default()
            })
            .collect();
        self.options(r).request(sequences)
    }

    /// The options of request number `r` (its seed derives from `--seed` and `r`).
    fn options(&self, r: u64) -> SampleOptions {
        SampleOptions {
            num_samples: self.args.num_samples,
            temperature: self.args.temperature,
            seed: sequence_seed(self.args.seed, r),
            method: if self.args.top_k { SamplingMethod::TopK } else { SamplingMethod::Sample },
            value_encoding: self.args.value_encoding.proto(),
            ..Default::default()
        }
    }

    /// Positions a complete answer returns.
    fn positions(&self) -> u64 {
        (self.args.sequences * (self.args.length - self.args.first_position as usize)) as u64
    }
}

/// What one caller saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    positions: u64,
    bytes: u64,
    entries: u64,
    errors: BTreeMap<&'static str, u64>,
    /// Answers whose shape was not the request's (a server bug).
    malformed: u64,
}

impl Tally {
    fn answer(&mut self, sent: Instant, expected_positions: u64, response: &SampleLogitsResponse) {
        self.latencies.push(sent.elapsed());
        // The message on the wire: protobuf bytes + the gRPC header (flag, length).
        self.bytes += response.encoded_len() as u64 + 5;
        let mut positions = 0u64;
        for s in &response.sequences {
            positions += s.offsets.len().saturating_sub(1) as u64;
            self.entries += s.token_ids.len() as u64;
        }
        if positions != expected_positions {
            self.malformed += 1;
        }
        self.positions += positions;
    }

    fn error(&mut self, code: Code) {
        *self.errors.entry(logitd_proto::code_name(code)).or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.positions += other.positions;
        self.bytes += other.bytes;
        self.entries += other.entries;
        self.malformed += other.malformed;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// Hands out request numbers until the count or the deadline is reached.
struct Tickets {
    next: AtomicU64,
    first: u64,
    limit: Option<u64>,
    until: Option<Instant>,
}

impl Tickets {
    fn take(&self) -> Option<u64> {
        if self.until.is_some_and(|u| Instant::now() >= u) {
            return None;
        }
        let r = self.next.fetch_add(1, Ordering::Relaxed);
        match self.limit {
            Some(l) if r - self.first >= l => None,
            _ => Some(r),
        }
    }
}

async fn unary_caller(
    mut raw: RawTeacherClient,
    requests: Arc<Requests>,
    tickets: Arc<Tickets>,
    timeout: Duration,
) -> Tally {
    let mut tally = Tally::default();
    while let Some(r) = tickets.take() {
        let mut req = Request::new(requests.get(r));
        req.set_timeout(timeout);
        let sent = Instant::now();
        match raw.sample_logits(req).await {
            Ok(resp) => tally.answer(sent, requests.positions(), resp.get_ref()),
            Err(status) => tally.error(status.code()),
        }
    }
    tally
}

async fn stream_caller(
    raw: RawTeacherClient,
    requests: Arc<Requests>,
    tickets: Arc<Tickets>,
    depth: usize,
    timeout: Duration,
) -> Tally {
    let mut tally = Tally::default();
    let mut done = false;
    while !done {
        // One stream; reopened after a failure (the requests in flight on it fail too).
        let (tx, rx) = mpsc::channel::<SampleLogitsRequest>(depth.max(1));
        let mut in_flight: VecDeque<Instant> = VecDeque::new();
        let send_next = |in_flight: &mut VecDeque<Instant>| match tickets.take() {
            Some(r) => {
                in_flight.push_back(Instant::now());
                tx.try_send(requests.get(r)).is_ok()
            }
            None => false,
        };
        while in_flight.len() < depth.max(1) && send_next(&mut in_flight) {}
        if in_flight.is_empty() {
            break;
        }
        let mut req = Request::new(ReceiverStream::new(rx));
        req.set_timeout(timeout);
        let mut raw = raw.clone();
        let failure = match raw.sample_logits_stream(req).await {
            Err(status) => Some(status),
            Ok(inbound) => {
                let mut inbound = inbound.into_inner();
                loop {
                    match inbound.message().await {
                        Ok(Some(response)) => {
                            let sent = in_flight.pop_front().unwrap_or_else(Instant::now);
                            tally.answer(sent, requests.positions(), &response);
                            if !send_next(&mut in_flight) && in_flight.is_empty() {
                                done = true;
                                break None;
                            }
                        }
                        Ok(None) => {
                            break (!in_flight.is_empty()).then(|| {
                                tonic::Status::internal("the stream ended with requests unanswered")
                            });
                        }
                        Err(status) => break Some(status),
                    }
                }
            }
        };
        if let Some(status) = failure {
            for _ in 0..in_flight.len().max(1) {
                tally.error(status.code());
            }
        }
    }
    tally
}

/// Runs `count` requests (or until `until`) with the configured callers.
async fn run_phase(
    client: &TeacherClient,
    args: &Args,
    requests: &Arc<Requests>,
    first: u64,
    limit: Option<u64>,
    until: Option<Instant>,
) -> (Tally, Duration, u64) {
    let tickets = Arc::new(Tickets { next: AtomicU64::new(first), first, limit, until });
    let timeout = Duration::from_secs_f64(args.timeout_s);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (raw, requests, tickets) = (client.raw(), requests.clone(), tickets.clone());
            match args.mode {
                Mode::Unary => tokio::spawn(unary_caller(raw, requests, tickets, timeout)),
                Mode::Stream => {
                    tokio::spawn(stream_caller(raw, requests, tickets, args.depth, timeout))
                }
            }
        })
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(t.await.expect("a caller task panicked"));
    }
    let next = tickets.next.load(Ordering::Relaxed);
    (tally, started.elapsed(), next)
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn finite(x: f64) -> serde_json::Value {
    if x.is_finite() { serde_json::json!(x) } else { serde_json::Value::Null }
}

/// The warm-up (not counted), then the measured phase, for a duration or a
/// number of requests.
async fn measure(
    client: &TeacherClient,
    args: &Args,
    requests: &Arc<Requests>,
) -> (Tally, Duration) {
    let mut next = 0;
    if args.warmup_requests > 0 {
        let (warm, _, n) =
            run_phase(client, args, requests, 0, Some(args.warmup_requests), None).await;
        if !warm.errors.is_empty() {
            eprintln!("logitd-bench: warm-up errors: {:?}", warm.errors);
        }
        next = n;
    }
    let (limit, until) = match (args.duration_s, args.requests) {
        (Some(d), _) => (None, Some(Instant::now() + Duration::from_secs_f64(d))),
        (None, r) => (Some(r.unwrap_or(100)), None),
    };
    let (tally, elapsed, _) = run_phase(client, args, requests, next, limit, until).await;
    (tally, elapsed)
}

/// The measured phase's tally with the rates and latencies both reports show.
struct Results {
    /// Latencies sorted.
    tally: Tally,
    secs: f64,
    ok: u64,
    failed: u64,
    positions: f64,
    tokens: f64,
    mean_ms: f64,
}

impl Results {
    fn of(mut tally: Tally, elapsed: Duration, args: &Args) -> Self {
        tally.latencies.sort_unstable();
        let ok = tally.latencies.len() as u64;
        let mean_ms = if ok > 0 {
            tally.latencies.iter().map(Duration::as_secs_f64).sum::<f64>() / ok as f64 * 1e3
        } else {
            f64::NAN
        };
        Self {
            secs: elapsed.as_secs_f64(),
            ok,
            failed: tally.errors.values().sum(),
            positions: tally.positions as f64,
            tokens: (ok * (args.sequences * args.length) as u64) as f64,
            mean_ms,
            tally,
        }
    }

    fn percentile_ms(&self, q: f64) -> f64 {
        percentile_ms(&self.tally.latencies, q)
    }
}

/// The results as the `--json` object.
fn json_report(args: &Args, info: &ModelInfo, r: &Results) -> serde_json::Value {
    let tally = &r.tally;
    serde_json::json!({
        "label": args.label,
        "server": args.server.join(","),
        "model_id": info.model_id,
        "device": info.device,
        "dtype": info.dtype,
        "vocab_size": info.vocab_size,
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "concurrency": args.concurrency,
        "depth": if args.mode == Mode::Stream { serde_json::json!(args.depth) } else { serde_json::Value::Null },
        "sequences_per_request": args.sequences,
        "length": args.length,
        "first_position": args.first_position,
        "num_samples": args.num_samples,
        "method": if args.top_k { "top_k" } else { "sample" },
        "value_encoding": format!("{:?}", args.value_encoding).to_lowercase(),
        "warmup_requests": args.warmup_requests,
        "requests_ok": r.ok,
        "requests_failed": r.failed,
        "errors": tally.errors,
        "malformed_responses": tally.malformed,
        "elapsed_s": r.secs,
        "positions": tally.positions,
        "positions_per_s": r.positions / r.secs,
        "tokens_per_s": r.tokens / r.secs,
        "requests_per_s": r.ok as f64 / r.secs,
        "latency_ms": {
            "p50": finite(r.percentile_ms(0.50)),
            "p90": finite(r.percentile_ms(0.90)),
            "p99": finite(r.percentile_ms(0.99)),
            "mean": finite(r.mean_ms),
            "max": finite(tally.latencies.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)),
        },
        "response_bytes": tally.bytes,
        "bytes_per_position": finite(tally.bytes as f64 / r.positions),
        "distinct_ids_per_position": finite(tally.entries as f64 / r.positions),
    })
}

/// The results as the printed table.
fn table_report(args: &Args, info: &ModelInfo, r: &Results) -> String {
    let tally = &r.tally;
    format!(
        "logitd-bench: {model} ({device}), {mode} x{conc}{depth}, {s} x {l} tokens per request, k = {k}, {enc}\n\
         requests        {ok} ok, {failed} failed {errors:?}{malformed}\n\
         elapsed         {secs:.2} s\n\
         throughput      {pps:.1} positions/s, {tps:.1} tokens/s, {rps:.2} requests/s\n\
         latency         p50 {p50:.1} ms, p90 {p90:.1} ms, p99 {p99:.1} ms (mean {mean_ms:.1})\n\
         wire            {bpp:.1} bytes/position ({bytes} bytes in all)\n\
         distinct ids    {ids:.1} per position",
        model = info.model_id,
        device = info.device,
        mode = format!("{:?}", args.mode).to_lowercase(),
        conc = args.concurrency,
        depth = if args.mode == Mode::Stream {
            format!(", depth {}", args.depth)
        } else {
            String::new()
        },
        s = args.sequences,
        l = args.length,
        k = args.num_samples,
        enc = format!("{:?}", args.value_encoding).to_lowercase(),
        ok = r.ok,
        failed = r.failed,
        errors = tally.errors,
        malformed = if tally.malformed > 0 {
            format!(", {} malformed answers", tally.malformed)
        } else {
            String::new()
        },
        secs = r.secs,
        pps = r.positions / r.secs,
        tps = r.tokens / r.secs,
        rps = r.ok as f64 / r.secs,
        p50 = r.percentile_ms(0.50),
        p90 = r.percentile_ms(0.90),
        p99 = r.percentile_ms(0.99),
        mean_ms = r.mean_ms,
        bpp = tally.bytes as f64 / r.positions,
        bytes = tally.bytes,
        ids = tally.entries as f64 / r.positions,
    )
}

/// Prints the table, and writes the JSON where `--json` asks (`-`: stdout,
/// the table then going to stderr).
fn emit(args: &Args, table: &str, report: &serde_json::Value) -> anyhow::Result<()> {
    match args.json.as_deref() {
        Some(p) if p == Path::new("-") => {
            eprintln!("{table}");
            println!("{report}");
        }
        Some(p) => {
            std::fs::write(p, format!("{report}\n"))
                .with_context(|| format!("writing {}", p.display()))?;
            println!("{table}");
        }
        None => println!("{table}"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let args = Args::parse();
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let mut config = ClientConfig::new(args.server.clone());
    config.bearer_token = args.auth_token.clone();
    config.timeout = Duration::from_secs_f64(args.timeout_s);
    let client = TeacherClient::connect(config).await.context("connecting to the teacher")?;
    let info = client.model_info().clone();
    let pool = sequence_pool(&args, info.vocab_size)?;
    let requests = Arc::new(Requests { pool, args: args.clone() });
    let (tally, elapsed) = measure(&client, &args, &requests).await;
    let results = Results::of(tally, elapsed, &args);
    emit(&args, &table_report(&args, &info, &results), &json_report(&args, &info, &results))
}
