//! The `logitd` binary: `serve`, `info` and `sample`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use logitd::{
    config::{Cli, Command, SampleArgs},
    model::PackedBatch,
    sampler::{CpuSampler, Method, RowKey, SampledRows, SamplingParams},
    server,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("logitd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            runtime.block_on(server::serve(*args))?;
        }
        Command::Info(args) => {
            let loaded = server::load_model(&args)?;
            let i = &loaded.info;
            let json = serde_json::json!({
                "model_id": i.model_id, "architecture": i.architecture, "vocab_size": i.vocab_size,
                "max_sequence_length": i.max_sequence_length, "dtype": i.dtype, "device": i.device,
                "tokenizer_sha256": i.tokenizer_sha256, "default_num_samples": i.default_num_samples,
                "max_num_samples": i.max_num_samples,
            });
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Command::Sample(args) => sample(&args)?,
    }
    Ok(())
}

/// `logitd sample`: every position of one sequence, the most drawn ids first.
fn sample(args: &SampleArgs) -> anyhow::Result<()> {
    let loaded = server::load_model(&args.model)?;
    let teacher = &loaded.teacher;
    let vocab = teacher.config().vocab_size;
    if let Some(t) = args.tokens.iter().find(|t| **t as usize >= vocab) {
        anyhow::bail!("token id {t} is outside the vocabulary of {vocab}");
    }
    let batch = PackedBatch::new(&[args.tokens.as_slice()])?;
    let hidden = teacher.hidden_states(&batch)?;
    let params = SamplingParams::new(Method::Sample, args.num_samples, args.temperature)?;
    let rows: Vec<u32> = (0..args.tokens.len() as u32).collect();
    let keys: Vec<RowKey> =
        rows.iter().map(|&p| RowKey { seed: args.seed, sequence: 0, position: p }).collect();
    let mut out = SampledRows::new();
    let chunk = args.model.head_chunk_rows.unwrap_or_else(|| teacher.default_head_chunk_rows());
    teacher.sample(&hidden, &rows, &keys, &params, chunk, &mut CpuSampler::new(), &mut out)?;
    println!(
        "model {} ({}), k = {}, T = {}, seed {}",
        loaded.info.model_id,
        loaded.info.architecture,
        args.num_samples,
        args.temperature,
        args.seed
    );
    for (p, &token) in args.tokens.iter().enumerate() {
        let row = out.row(p);
        let mut order: Vec<usize> = (0..row.token_ids.len()).collect();
        order.sort_by(|&a, &b| {
            row.counts[b].cmp(&row.counts[a]).then(row.token_ids[a].cmp(&row.token_ids[b]))
        });
        let shown: Vec<String> = order
            .iter()
            .take(args.show)
            .map(|&i| {
                format!("{}×{} (logp {:.3})", row.token_ids[i], row.counts[i], row.logprobs[i])
            })
            .collect();
        println!(
            "position {p:>4} after token {token:>6}: {} distinct; {}",
            row.token_ids.len(),
            shown.join(", ")
        );
    }
    Ok(())
}
