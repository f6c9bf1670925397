//! `logitd-client`: tools for trainers.
//!
//! `logitd-client dump --server URI --input corpus.jsonl --out DIR` asks a logitd
//! server for the teacher targets of every sequence of a corpus and writes them
//! as safetensors shards (see `logitd_client::shard`), with a progress bar.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use logitd_client::{
    ClientConfig, Prefetcher, SampleOptions, TeacherClient, TrainingBatch,
    corpus::read_corpus,
    shard::{ShardMeta, ShardWriter},
};

/// Tools for student trainers that use a logitd teacher.
#[derive(Parser)]
#[command(name = "logitd-client", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the teacher targets of a corpus once and write them as shards.
    Dump(Dump),
}

#[derive(clap::Args)]
struct Dump {
    /// Server URI(s), comma-separated, e.g. http://127.0.0.1:50051 (several are balanced).
    #[arg(long, env = "LOGITD_SERVER", value_delimiter = ',', required = true)]
    server: Vec<String>,
    /// JSON lines: one sequence per line, either an array of token ids or
    /// {"token_ids": [...], "first_position": N}.
    #[arg(long)]
    input: PathBuf,
    /// Output directory for the shards (must not hold shards yet).
    #[arg(long)]
    out: PathBuf,
    /// Draws per position (0 = the server default).
    #[arg(long, default_value_t = 0)]
    num_samples: u32,
    /// Softmax temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Seed of the run (each sequence's seed derives from it and its index).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use top-k instead of sampling.
    #[arg(long)]
    top_k: bool,
    /// Sequences per request.
    #[arg(long, default_value_t = 16)]
    batch_sequences: usize,
    /// Requests in flight on the stream.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Entries (id, count, logprob) per shard file.
    #[arg(long, default_value_t = 4 << 20)]
    shard_entries: usize,
    /// Bearer token for the server.
    #[arg(long, env = "LOGITD_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Refuse a server whose tokenizer digest differs.
    #[arg(long)]
    expect_tokenizer_sha256: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let Command::Dump(args) = Cli::parse().command;
    let corpus = read_corpus(&args.input)?;
    anyhow::ensure!(!corpus.is_empty(), "{} holds no sequences", args.input.display());
    let mut config = ClientConfig::new(args.server.clone());
    config.bearer_token = args.auth_token.clone();
    config.expect_tokenizer_sha256 = args.expect_tokenizer_sha256.clone();
    let client = TeacherClient::connect(config).await.context("connecting to the teacher")?;
    let info = client.model_info().clone();
    let options = SampleOptions {
        num_samples: args.num_samples,
        temperature: Some(args.temperature),
        seed: args.seed,
        method: if args.top_k { 2 } else { 1 },
        value_encoding: 1,
    };
    let k = if args.num_samples == 0 { info.default_num_samples } else { args.num_samples };
    let meta = ShardMeta {
        model_id: info.model_id.clone(),
        tokenizer_sha256: info.tokenizer_sha256.clone(),
        num_samples: k,
        temperature: args.temperature.to_string(),
        seed: args.seed,
        method: options.method,
        value_encoding: options.value_encoding,
    };
    let mut writer = ShardWriter::create(&args.out, meta, args.shard_entries)?;
    let total_tokens: u64 = corpus.iter().map(|(t, _)| t.len() as u64).sum();
    let bar = ProgressBar::new(total_tokens).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tokens  {per_sec}  eta {eta}  {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let batches: Vec<TrainingBatch> = corpus
        .chunks(args.batch_sequences.max(1))
        .enumerate()
        .map(|(i, chunk)| TrainingBatch {
            sequences: chunk.iter().map(|(t, _)| t.clone()).collect(),
            first_positions: Some(chunk.iter().map(|(_, f)| *f).collect()),
            loss_mask: None,
            seed: logitd_client::sequence_seed(args.seed, i as u64),
        })
        .collect();
    let started = Instant::now();
    let mut prefetcher = Prefetcher::start(client, batches.into_iter(), args.depth, options);
    let (mut sequences, mut entries) = (0usize, 0usize);
    while let Some(item) = prefetcher.next().await {
        let targets =
            item.targets.with_context(|| format!("batch starting at sequence {sequences}"))?;
        for (t, tokens) in targets.iter().zip(&item.batch.sequences) {
            writer.append(t)?;
            entries += t.token_ids.len();
            bar.inc(tokens.len() as u64);
        }
        sequences += targets.len();
        bar.set_message(format!("{sequences} sequences"));
    }
    let files = writer.finish()?;
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {sequences} sequences, {total_tokens} tokens, {entries} entries ({:.1} per position) in {} shard(s) to {} in {secs:.1} s ({:.0} tokens/s); teacher {}",
        entries as f64 / total_tokens as f64,
        files.len(),
        args.out.display(),
        total_tokens as f64 / secs,
        info.model_id
    );
    Ok(())
}
