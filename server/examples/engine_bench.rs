//! logitd without gRPC: the engine alone, and the sampler alone, for the
//! side-by-side comparison in `tests/bench/compare.sh`.
//!
//! ```text
//! engine_bench engine  MODEL CORPUS.jsonl SEQUENCES LENGTH K DURATION_S|stdin [WARMUP]
//! engine_bench sampler LOGITS.f32 VOCAB K MIN_TIME_S
//! ```
//!
//! `engine` runs batches of SEQUENCES × LENGTH tokens (the sequences
//! `logitd-bench --input CORPUS --length L` sends: batch r is made of corpus
//! lines r·S … r·S + S − 1, cycling, each cut to LENGTH tokens) through
//! [`Engine::score`] — forward, chunked LM head and sampler, exactly as the
//! server's engine thread does, but with no queue, no batcher and no gRPC — for
//! DURATION_S seconds after WARMUP (default 1) batches. Then it runs two more
//! batches step by step to say where the time goes: forward, LM head, sampler,
//! and the response encoding (rows → protobuf bytes) the service adds. With
//! `stdin` instead of a duration it keeps the model loaded and measures once
//! per line read from stdin (each line a duration in seconds), printing a JSON
//! line each time, so a driver can interleave it finely with other measurements.
//!
//! A GGUF teacher is loaded as `logitd serve` loads it, its quantized matrices
//! kept; `LOGITD_DTYPE=f32` widens them at load as `--dtype f32` does.
//!
//! `sampler` reads row-major little-endian f32 logits (rows × VOCAB) and samples
//! every row with the CPU reference sampler (k draws, T = 1) as the engine does
//! (`CpuSampler::sample_rows`, on `RAYON_NUM_THREADS` threads), repeating the
//! pass for at least MIN_TIME_S seconds.
//!
//! `scores` measures what the on-policy scores cost: rounds of an engine batch
//! without them and the same batch with the realised tokens' log-probabilities
//! and CANDIDATES candidate ids per position, in alternating order, each
//! timed for SECONDS; one JSON line per round with both rates and their ratio.
//!
//! ```text
//! engine_bench scores MODEL CORPUS.jsonl SEQUENCES LENGTH K CANDIDATES ROUNDS SECONDS
//! ```
//!
//! `shared` measures shared-prefix packing: G rollouts of one PROMPT-token
//! prompt, each COMPLETION tokens long, scored (completions only) with and
//! without sharing, alternating, one batch each per round; one JSON line per
//! round with both rates, their ratio and each one's peak RSS (a last argument
//! `whole` or `shared` runs one batch of that variant alone, for a clean peak).
//!
//! ```text
//! engine_bench shared MODEL CORPUS.jsonl|TEXT G PROMPT COMPLETION K ROUNDS [whole|shared]
//! ```
//!
//! Each prints JSON lines.

use std::{io::BufRead, path::Path, time::Instant};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use logitd::{
    engine::{DEFAULT_MIN_SHARED_PREFIX, Engine},
    model::{PackedBatch, Teacher},
    queue::{Scores, WorkItem},
    response::{Asked, sampled_sequence},
    sampler::{CpuSampler, Method, RowKey, SampledRows, SamplingParams},
    scoring::SamplerBackend,
};
use logitd_proto::v1::{SampleLogitsResponse, ValueEncoding};
use prost::Message;

/// The seed of request `r` (splitmix64 of the batch seed 0 and r, as
/// `logitd_client::sequence_seed` derives it).
fn request_seed(r: u64) -> u64 {
    let mut x = r.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn read_pool(path: &Path, length: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pool = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let ids = match v {
            serde_json::Value::Object(mut o) => o.remove("token_ids").context("no token_ids")?,
            v => v,
        };
        let mut ids: Vec<u32> = serde_json::from_value(ids)?;
        if ids.len() >= length {
            ids.truncate(length);
            pool.push(ids);
        }
    }
    if pool.is_empty() {
        bail!("{} holds no sequence of {length} tokens", path.display());
    }
    Ok(pool)
}

fn items(pool: &[Vec<u32>], r: u64, sequences: usize, params: SamplingParams) -> Vec<WorkItem> {
    let s = sequences as u64;
    (0..s)
        .map(|i| WorkItem {
            tokens: pool[((r * s + i) % pool.len() as u64) as usize].clone(),
            first_position: 0,
            params,
            seed: request_seed(r),
            key_sequence: i as u32,
            deadline: None,
            enqueued: Instant::now(),
            scores: Scores::default(),
            reply: tokio::sync::oneshot::channel().0,
        })
        .collect()
}

/// [`items`] that also ask for the realised tokens and `candidates` ids per
/// position (spread over the vocabulary, the realised token among them).
fn scored_items(
    pool: &[Vec<u32>],
    r: u64,
    sequences: usize,
    params: SamplingParams,
    candidates: usize,
    vocab: usize,
) -> Vec<WorkItem> {
    let mut work = items(pool, r, sequences, params);
    for w in &mut work {
        let n = w.tokens.len();
        let mut scores = Scores { realised: true, ..Scores::default() };
        scores.candidate_offsets.push(0);
        for p in 0..n {
            for c in 0..candidates {
                let id = if c == 0 && p + 1 < n {
                    w.tokens[p + 1]
                } else {
                    (request_seed((p * candidates + c) as u64) % vocab as u64) as u32
                };
                scores.candidate_ids.push(id);
            }
            scores.candidate_offsets.push(scores.candidate_ids.len() as u32);
        }
        w.scores = scores;
    }
    work
}

/// Interleaved rounds: plain batches, then scored ones (or the other way
/// round every other round), each for `seconds`.
fn scores(args: &[String]) -> anyhow::Result<()> {
    let [model, corpus, sequences, length, k, candidates, rounds, seconds] = &args[..8] else {
        bail!("usage: scores MODEL CORPUS SEQUENCES LENGTH K CANDIDATES ROUNDS SECONDS");
    };
    let (sequences, length): (usize, usize) = (sequences.parse()?, length.parse()?);
    let (k, candidates, rounds): (u32, usize, usize) =
        (k.parse()?, candidates.parse()?, rounds.parse()?);
    let seconds: f64 = seconds.parse()?;
    let pool = read_pool(Path::new(corpus), length)?;
    let teacher = load(model)?;
    let vocab = teacher.config().vocab_size;
    let mut engine = Engine::new(teacher, None)?;
    let params = SamplingParams::new(Method::Sample, k, 1.0)?;
    let mut r = 0u64;
    // Warm-up: one of each.
    engine.score(&items(&pool, r, sequences, params))?;
    engine.score(&scored_items(&pool, r, sequences, params, candidates, vocab))?;
    for round in 0..rounds {
        let mut rate = [0f64; 2];
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for scored in order {
            let (mut positions, started) = (0u64, Instant::now());
            while started.elapsed().as_secs_f64() < seconds || positions == 0 {
                let work = if scored {
                    scored_items(&pool, r, sequences, params, candidates, vocab)
                } else {
                    items(&pool, r, sequences, params)
                };
                let results = engine.score(&work)?;
                positions += results.iter().map(|rows| rows.num_rows() as u64).sum::<u64>();
                r += 1;
            }
            rate[usize::from(scored)] = positions as f64 / started.elapsed().as_secs_f64();
        }
        println!(
            "{}",
            serde_json::json!({
                "round": round,
                "threads": candle_core::utils::get_num_threads(),
                "sequences": sequences,
                "length": length,
                "num_samples": k,
                "candidates": candidates,
                "plain_positions_per_s": rate[0],
                "scored_positions_per_s": rate[1],
                "scored_over_plain": rate[1] / rate[0],
            })
        );
    }
    Ok(())
}

/// Resets the process's peak resident set (Linux: `clear_refs` 5), so that
/// [`peak_rss_mib`] reads the peak of what runs after.
fn reset_peak_rss() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")
}

/// The peak resident set since the last [`reset_peak_rss`] (VmHWM), in MiB.
fn peak_rss_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// A text file tokenised with the model's own tokenizer, cut into lines of
/// `length` tokens.
fn text_pool(model: &Path, text: &Path, length: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let tokenizer = logitd::model::load_tokenizer(model, None)?;
    let text = std::fs::read_to_string(text).with_context(|| format!("{}", text.display()))?;
    let ids = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pool: Vec<Vec<u32>> = ids.get_ids().chunks_exact(length).map(<[u32]>::to_vec).collect();
    if pool.len() < 2 {
        bail!("the text holds fewer than 2 × {length} tokens");
    }
    Ok(pool)
}

/// Scores `work` once, sharing prefixes (the server's default minimum) or
/// not: returned positions per second.
fn score_timed(engine: &mut Engine, sharing: bool, work: &[WorkItem]) -> anyhow::Result<f64> {
    engine.set_min_shared_prefix(if sharing { DEFAULT_MIN_SHARED_PREFIX } else { 0 });
    let started = Instant::now();
    let results = engine.score(work)?;
    let positions: usize = results.iter().map(SampledRows::num_rows).sum();
    Ok(positions as f64 / started.elapsed().as_secs_f64())
}

/// `shared`: G rollouts of one prompt, scored with and without shared-prefix
/// packing (`Engine::set_min_shared_prefix` at its default, 32, and 0), in alternating order,
/// one batch each per round. The corpus is a token JSONL file or a text file
/// (tokenised with the model's tokenizer, cut into lines of max(PROMPT,
/// COMPLETION) tokens). Prompt r is corpus line r cut to PROMPT tokens;
/// rollout g continues it with the last COMPLETION tokens of line r + 1 + g.
/// Only the completions' positions are returned (first_position = PROMPT).
/// One JSON line per round: both rates (returned positions per second), their
/// ratio and each variant's peak RSS during its batch (which includes what the
/// allocator kept from earlier batches). With a last argument `whole` or
/// `shared`: one batch of that variant only, in this fresh process, and the
/// process's peak RSS.
fn shared(args: &[String]) -> anyhow::Result<()> {
    let [model, corpus, g, prompt, completion, k, rounds] = &args[..7] else {
        bail!("usage: shared MODEL CORPUS G PROMPT COMPLETION K ROUNDS");
    };
    let (g, prompt, completion): (usize, usize, usize) =
        (g.parse()?, prompt.parse()?, completion.parse()?);
    let (k, rounds): (u32, usize) = (k.parse()?, rounds.parse()?);
    let length = prompt.max(completion);
    let pool = if corpus.ends_with(".jsonl") {
        read_pool(Path::new(corpus), length)?
    } else {
        text_pool(Path::new(model), Path::new(corpus), length)?
    };
    let teacher = load(model)?;
    let mut engine = Engine::new(teacher, None)?;
    let params = SamplingParams::new(Method::Sample, k, 1.0)?;
    let batch = |r: usize| -> Vec<WorkItem> {
        let head = &pool[r % pool.len()][..prompt];
        (0..g)
            .map(|i| {
                let line = &pool[(r + 1 + i) % pool.len()];
                let tail = &line[line.len() - completion..];
                let tokens: Vec<u32> = head.iter().chain(tail).copied().collect();
                let key = RowKey { seed: request_seed(r as u64), sequence: i as u32, position: 0 };
                WorkItem::new(tokens, prompt as u32, params, key, None, Instant::now()).0
            })
            .collect()
    };
    if let Some(only) = args.get(7) {
        // One batch of one variant in a fresh process, no warm-up: the
        // process's peak RSS (model included) is this batch's.
        let sharing = match only.as_str() {
            "shared" => true,
            "whole" => false,
            other => bail!("expected `shared` or `whole`, not {other:?}"),
        };
        let rate = score_timed(&mut engine, sharing, &batch(0))?;
        println!(
            "{}",
            serde_json::json!({
                "only": only,
                "g": g,
                "prompt": prompt,
                "completion": completion,
                "positions_per_s": rate,
                "process_peak_rss_mib": peak_rss_mib()?,
            })
        );
        return Ok(());
    }
    engine.score(&batch(0))?; // warm-up
    for round in 0..rounds {
        let mut rate = [0f64; 2];
        let mut peak = [0f64; 2];
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for sharing in order {
            let work = batch(round);
            reset_peak_rss()?;
            rate[usize::from(sharing)] = score_timed(&mut engine, sharing, &work)?;
            peak[usize::from(sharing)] = peak_rss_mib()?;
        }
        println!(
            "{}",
            serde_json::json!({
                "round": round,
                "threads": candle_core::utils::get_num_threads(),
                "g": g,
                "prompt": prompt,
                "completion": completion,
                "num_samples": k,
                "whole_positions_per_s": rate[0],
                "shared_positions_per_s": rate[1],
                "shared_over_whole": rate[1] / rate[0],
                "whole_peak_rss_mib": peak[0],
                "shared_peak_rss_mib": peak[1],
            })
        );
    }
    Ok(())
}

fn encode(results: Vec<SampledRows>) -> usize {
    let response = SampleLogitsResponse {
        sequences: results
            .into_iter()
            .map(|rows| sampled_sequence(rows, Asked::samples(0), ValueEncoding::F32))
            .collect(),
        seed: 1,
        model_id: "bench".into(),
        num_samples: 256,
        temperature: 1.0,
        method: 1,
        value_encoding: ValueEncoding::F32 as i32,
    };
    response.encode_to_vec().len() + 5
}

fn engine(args: &[String]) -> anyhow::Result<()> {
    let [model, corpus, sequences, length, k, duration] = &args[..6] else {
        bail!("usage: engine MODEL CORPUS SEQUENCES LENGTH K DURATION_S|stdin [WARMUP]");
    };
    let (sequences, length): (usize, usize) = (sequences.parse()?, length.parse()?);
    let k: u32 = k.parse()?;
    let warmup: u64 = args.get(6).map_or(Ok(1), |s| s.parse())?;
    let pool = read_pool(Path::new(corpus), length)?;
    let teacher = load(model)?;
    let mut engine = Engine::new(teacher, None)?;
    let params = SamplingParams::new(Method::Sample, k, 1.0)?;
    let mut bench = Bench { model, pool, sequences, length, k, params, r: 0 };
    for _ in 0..warmup {
        engine.score(&items(&bench.pool, bench.r, sequences, params))?;
        bench.r += 1;
    }
    if duration == "stdin" {
        for line in std::io::stdin().lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            bench.measure(&mut engine, line.trim().parse()?)?;
        }
        Ok(())
    } else {
        bench.measure(&mut engine, duration.parse()?)
    }
}

struct Bench<'a> {
    model: &'a str,
    pool: Vec<Vec<u32>>,
    sequences: usize,
    length: usize,
    k: u32,
    params: SamplingParams,
    /// The next batch's number.
    r: u64,
}

impl Bench<'_> {
    /// (b) for `duration` seconds, then the step-by-step breakdown; one JSON line.
    fn measure(&mut self, engine: &mut Engine, duration: f64) -> anyhow::Result<()> {
        let (pool, sequences, params) = (&self.pool, self.sequences, self.params);
        // (b): Engine::score only, back to back, for the duration.
        let (mut batches, mut positions, mut entries) = (0u64, 0u64, 0u64);
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < duration || batches == 0 {
            let results = engine.score(&items(pool, self.r, sequences, params))?;
            for rows in &results {
                positions += rows.num_rows() as u64;
                entries += rows.num_entries() as u64;
            }
            batches += 1;
            self.r += 1;
        }
        let secs = started.elapsed().as_secs_f64();

        // Where the time goes: the same work step by step (two batches).
        let teacher = engine.teacher();
        let vocab = teacher.config().vocab_size;
        let chunk_rows = SamplerBackend::new(teacher.device(), vocab, None)?.chunk_rows();
        let mut sampler = CpuSampler::new();
        let (mut forward_s, mut head_s, mut sample_s, mut encode_s) = (0.0, 0.0, 0.0, 0.0);
        let (mut split_positions, mut bytes) = (0u64, 0u64);
        for _ in 0..2 {
            let work = items(pool, self.r, sequences, params);
            self.r += 1;
            let seqs: Vec<&[u32]> = work.iter().map(|w| w.tokens.as_slice()).collect();
            let batch = PackedBatch::new(&seqs)?;
            let t = Instant::now();
            let hidden = teacher.hidden_states(&batch)?;
            forward_s += t.elapsed().as_secs_f64();
            let mut results = Vec::new();
            for (s, w) in work.iter().enumerate() {
                let start = batch.sequence(s).start as u32;
                let rows: Vec<u32> = (0..w.tokens.len() as u32).map(|p| start + p).collect();
                let keys: Vec<RowKey> = (0..w.tokens.len() as u32)
                    .map(|p| RowKey { seed: w.seed, sequence: w.key_sequence, position: p })
                    .collect();
                let mut out = SampledRows::new();
                for (chunk, chunk_keys) in rows.chunks(chunk_rows).zip(keys.chunks(chunk_rows)) {
                    let t = Instant::now();
                    let idx = Tensor::from_slice(chunk, chunk.len(), teacher.device())?;
                    let logits = teacher.logits(&hidden.index_select(&idx, 0)?)?.contiguous()?;
                    let flat = logits.flatten_all()?;
                    let (storage, layout) = flat.storage_and_layout();
                    let candle_core::Storage::Cpu(cpu) = &*storage else { bail!("not on the CPU") };
                    let data = &cpu.as_slice::<f32>()?[layout.start_offset()..];
                    head_s += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    sampler.sample_rows(
                        &data[..chunk.len() * vocab],
                        vocab,
                        &params,
                        chunk_keys,
                        &mut out,
                    )?;
                    sample_s += t.elapsed().as_secs_f64();
                }
                split_positions += out.num_rows() as u64;
                results.push(out);
            }
            let t = Instant::now();
            bytes += encode(results) as u64;
            encode_s += t.elapsed().as_secs_f64();
        }
        let per_position_us = |s: f64| s / split_positions as f64 * 1e6;
        println!(
            "{}",
            serde_json::json!({
                "model": self.model,
                "threads": candle_core::utils::get_num_threads(),
                "sequences": sequences,
                "length": self.length,
                "num_samples": self.k,
                "vocab_size": vocab,
                "batches": batches,
                "positions": positions,
                "elapsed_s": secs,
                "positions_per_s": positions as f64 / secs,
                "distinct_ids_per_position": entries as f64 / positions as f64,
                "breakdown_us_per_position": {
                    "forward": per_position_us(forward_s),
                    "lm_head": per_position_us(head_s),
                    "sampler": per_position_us(sample_s),
                    "encode": per_position_us(encode_s),
                },
                "encoded_bytes_per_position": bytes as f64 / split_positions as f64,
            })
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        Ok(())
    }
}

fn sampler(args: &[String]) -> anyhow::Result<()> {
    let [path, vocab, k, min_time] = &args[..4] else {
        bail!("usage: sampler LOGITS.f32 VOCAB K MIN_TIME_S");
    };
    let (vocab, k, min_time): (usize, u32, f64) = (vocab.parse()?, k.parse()?, min_time.parse()?);
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let logits: Vec<f32> =
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    anyhow::ensure!(
        logits.len().is_multiple_of(vocab) && !logits.is_empty(),
        "not rows of {vocab}"
    );
    let rows = logits.len() / vocab;
    let params = SamplingParams::new(Method::Sample, k, 1.0)?;
    let keys: Vec<RowKey> =
        (0..rows as u32).map(|p| RowKey { seed: 1, sequence: 0, position: p }).collect();
    let mut sampler = CpuSampler::new();
    // One untimed pass (scratch buffers, page faults).
    let mut out = SampledRows::new();
    sampler.sample_rows(&logits, vocab, &params, &keys, &mut out)?;
    let entries = out.num_entries();
    let (mut passes, started) = (0u64, Instant::now());
    while started.elapsed().as_secs_f64() < min_time || passes == 0 {
        let mut out = SampledRows::new();
        sampler.sample_rows(&logits, vocab, &params, &keys, &mut out)?;
        std::hint::black_box(out);
        passes += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "vocab_size": vocab,
            "num_samples": k,
            "threads": candle_core::utils::get_num_threads(),
            "passes": passes,
            "us_per_row": secs / (passes as f64 * rows as f64) * 1e6,
            "distinct_ids_per_row": entries as f64 / rows as f64,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // As the `logitd` binary: freed tensor memory reused (`logitd::malloc`).
    logitd::malloc::keep_tensor_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("engine") if args.len() >= 7 => engine(&args[1..]),
        Some("sampler") if args.len() >= 5 => sampler(&args[1..]),
        Some("scores") if args.len() >= 9 => scores(&args[1..]),
        Some("shared") if args.len() >= 8 => shared(&args[1..]),
        _ => bail!(
            "usage: engine_bench engine MODEL CORPUS SEQUENCES LENGTH K DURATION_S [WARMUP]\n       \
             engine_bench sampler LOGITS.f32 VOCAB K MIN_TIME_S\n       \
             engine_bench scores MODEL CORPUS SEQUENCES LENGTH K CANDIDATES ROUNDS SECONDS\n       \
             engine_bench shared MODEL CORPUS G PROMPT COMPLETION K ROUNDS [whole|shared]"
        ),
    }
}

/// The teacher as `logitd serve` loads it on the CPU: a GGUF file kept
/// quantized (anything else in f32, as `load_kept` does) unless
/// `LOGITD_DTYPE=f32` (the server's variable) widens it.
fn load(model: &str) -> anyhow::Result<Teacher> {
    let path = Path::new(model);
    Ok(if std::env::var("LOGITD_DTYPE").is_ok_and(|d| d == "f32") {
        Teacher::load(path, &Device::Cpu, DType::F32)?
    } else {
        Teacher::load_kept(path, &Device::Cpu)?
    })
}
