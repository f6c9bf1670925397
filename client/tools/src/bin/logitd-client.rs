//! `logitd-client`: tools for trainers.
//!
//! `logitd-client dump --server URI --input corpus.jsonl --out DIR` asks a logitd
//! server for the teacher targets of every sequence of a corpus and writes them
//! as safetensors shards (see `logitd_client_tools::dump` and `logitd_client::shard`),
//! or with `--format axolotl|distillkit` as Parquet those trainers load (see
//! `logitd_client::formats`), with a progress bar.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use logitd_client::formats::TargetFormat;
use logitd_client_tools::{
    corpus::Columns,
    dump::{DumpOptions, run},
};

/// Tools for student trainers that use a logitd teacher.
#[derive(Parser)]
// The about line is the client's, not this package's description (the
// command-line reference shows it).
#[command(
    name = "logitd-client",
    version,
    about = "logitd client for student trainers: sparse teacher targets and the distillation loss"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the teacher targets of a corpus once and write them as shards:
    /// streamed, resumable (rerun the same command), split across workers.
    Dump(Dump),
}

#[derive(clap::Args)]
struct Dump {
    /// Server URI(s), comma-separated, e.g. http://127.0.0.1:50051 (several are balanced).
    #[arg(long, env = "LOGITD_SERVER", value_delimiter = ',', required = true)]
    server: Vec<String>,
    /// Corpus files or glob patterns (each expanded in name order), read in
    /// the order given: JSON lines (one sequence per line, an array of token
    /// ids or {"token_ids": [...], "first_position": N}) or `*.parquet`.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<String>,
    /// Parquet: the list-of-integers column holding the token ids.
    #[arg(long, default_value = "input_ids")]
    ids_column: String,
    /// Parquet: an integer column with each row's first returned position.
    #[arg(long, conflicts_with = "loss_mask_column")]
    first_position_column: Option<String>,
    /// Parquet: a list column aligned with the ids; the first non-zero entry
    /// is the first returned position.
    #[arg(long)]
    loss_mask_column: Option<String>,
    /// Output folder. Rerunning with the same arguments resumes; other
    /// arguments are refused. Workers may share it.
    #[arg(long)]
    out: PathBuf,
    /// Draws per position (0 = the server default).
    #[arg(long, default_value_t = 0)]
    num_samples: u32,
    /// Softmax temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Seed of the run: sequence n's samples depend only on it and n.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also keep the teacher's log-probability and rank of the realised next
    /// token at every position (the on-policy columns; shard format 2).
    #[arg(long)]
    token_logprobs: bool,
    /// Use top-k instead of sampling.
    #[arg(long)]
    top_k: bool,
    /// Sequences per request (does not change the targets).
    #[arg(long, default_value_t = 16)]
    batch_sequences: usize,
    /// Requests in flight (does not change the targets).
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Entries (id, count, logprob) per shard file.
    #[arg(long, default_value_t = 4 << 20)]
    shard_entries: usize,
    /// This worker's index, 0-based (in a Kubernetes Indexed Job: the pod's
    /// completion index).
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    worker: u32,
    /// Workers the corpus is split across (contiguous ranges of sequences).
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Bearer token for the server.
    #[arg(long, env = "LOGITD_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Refuse a server whose tokenizer digest differs.
    #[arg(long)]
    expect_tokenizer_sha256: Option<String>,
    /// What to write: logitd's safetensors shards, or Parquet that a trainer
    /// loads as it is: Axolotl's KD columns (`target_token_ids`,
    /// `target_logprobs`, `target_mask`), or DistillKit's raw columns
    /// (`token_ids`, `top_values`; needs --temperature 1 and sequences of one
    /// length). Ids by descending log p; counts in an extra column. The
    /// Python package and the Rust client read all three.
    #[arg(long, value_enum, default_value_t = Format::Logitd)]
    format: Format,
}

/// `--format`: [`TargetFormat`] on the command line (the library has no clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// logitd's safetensors shards (CSR columns; the Python package and the
    /// Rust client read them).
    Logitd,
    /// Parquet with Axolotl's pre-tokenized KD columns.
    Axolotl,
    /// Parquet with DistillKit's raw offline columns (temperature 1, one
    /// sequence length).
    Distillkit,
}

impl From<Format> for TargetFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Logitd => TargetFormat::Logitd,
            Format::Axolotl => TargetFormat::Axolotl,
            Format::Distillkit => TargetFormat::Distillkit,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let Command::Dump(a) = Cli::parse().command;
    let out = a.out.clone();
    let summary = run(DumpOptions {
        servers: a.server,
        inputs: a.input,
        columns: Columns {
            ids: a.ids_column,
            first_position: a.first_position_column,
            loss_mask: a.loss_mask_column,
        },
        out: a.out,
        num_samples: a.num_samples,
        temperature: a.temperature,
        seed: a.seed,
        top_k: a.top_k,
        token_logprobs: a.token_logprobs,
        batch_sequences: a.batch_sequences,
        depth: a.depth,
        shard_entries: a.shard_entries,
        auth_token: a.auth_token,
        expect_tokenizer_sha256: a.expect_tokenizer_sha256,
        worker: a.worker,
        workers: a.workers,
        format: a.format.into(),
    })
    .await?;
    println!("{}", summary.line(&out));
    Ok(())
}
