//! The `logitd` binary: `serve`, `info` and `sample`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use logitd::{
    cli::{Cli, Command, SampleArgs},
    model::{PackedBatch, load_tokenizer},
    sampler::{Method, RowKey, RowQueries, SampledRows, SamplingParams},
    scoring::SamplerBackend,
    server,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The forward's large, short-lived tensors: reuse freed memory instead of
    // a fresh mmap per tensor (process-wide; see `logitd::malloc`).
    logitd::malloc::keep_tensor_memory();
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("logitd: --log {:?} is not a log filter: {e}", cli.log);
            return ExitCode::from(2);
        }
    };
    // Colours only on a terminal: log collectors get plain text.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
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
                "max_num_samples": i.max_num_samples, "max_candidates": i.max_candidates,
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
    let model_path = args.model.model.clone().unwrap_or_else(logitd::model::demo_teacher);
    let tokenizer = match (&args.text, &args.tokenizer) {
        (Some(_), _) | (None, Some(_)) => {
            Some(load_tokenizer(&model_path, args.tokenizer.as_deref())?)
        }
        // Token ids alone: show pieces when the model carries a tokenizer.
        (None, None) => load_tokenizer(&model_path, None).ok(),
    };
    let tokens: Vec<u32> = match &args.text {
        Some(text) => {
            let tokenizer = tokenizer.as_ref().expect("loaded above for --text");
            tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing --text: {e}"))?
                .get_ids()
                .to_vec()
        }
        None => args.tokens.clone(),
    };
    anyhow::ensure!(!tokens.is_empty(), "nothing to score: the text has no tokens");
    let vocab = teacher.config().vocab_size;
    if let Some(t) = tokens.iter().find(|t| **t as usize >= vocab) {
        anyhow::bail!("token id {t} is outside the vocabulary of {vocab}");
    }
    let piece = |id: u32| -> String {
        tokenizer
            .as_ref()
            .and_then(|t| t.decode(&[id], false).ok())
            .map_or_else(|| id.to_string(), |p| format!("{id} {p:?}"))
    };
    let batch = PackedBatch::new(&[tokens.as_slice()])?;
    let hidden = teacher.hidden_states(&batch)?;
    let params = SamplingParams::new(Method::Sample, args.num_samples, args.temperature)?;
    let rows: Vec<u32> = (0..tokens.len() as u32).collect();
    let keys: Vec<RowKey> =
        rows.iter().map(|&p| RowKey { seed: args.seed, sequence: 0, position: p }).collect();
    let mut out = SampledRows::new();
    let vocab = teacher.config().vocab_size;
    let mut sampler = SamplerBackend::new(teacher.device(), vocab, args.model.head_chunk_rows)?;
    sampler.sample(teacher, &hidden, &rows, &keys, RowQueries::NONE, &params, &mut out)?;
    println!(
        "model {} ({}), k = {}, T = {}, seed {}",
        loaded.info.model_id,
        loaded.info.architecture,
        args.num_samples,
        args.temperature,
        args.seed
    );
    for (p, &token) in tokens.iter().enumerate() {
        let row = out.row(p);
        let mut order: Vec<usize> = (0..row.token_ids.len()).collect();
        order.sort_by(|&a, &b| {
            row.counts[b].cmp(&row.counts[a]).then(row.token_ids[a].cmp(&row.token_ids[b]))
        });
        let shown: Vec<String> = order
            .iter()
            .take(args.show)
            .map(|&i| {
                format!(
                    "{}×{} (logp {:.3})",
                    piece(row.token_ids[i]),
                    row.counts[i],
                    row.logprobs[i]
                )
            })
            .collect();
        println!(
            "position {p:>3} after {}: {} distinct; {}",
            piece(token),
            row.token_ids.len(),
            shown.join(", ")
        );
    }
    if let Some(bytes) = peak_rss() {
        // What the teacher took to load and score this sequence: for sizing
        // a machine (and read by server/tests/memory.rs).
        tracing::info!(peak_rss_bytes = bytes, "peak resident memory");
    }
    Ok(())
}

/// This process's peak resident set (VmHWM in /proc/self/status: of its own
/// address space since exec, transient allocations and mapped file pages
/// included); `None` where there is no procfs.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 =
        line.trim_start_matches("VmHWM:").trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}
