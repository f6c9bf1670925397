//! Forward throughput and peak memory of a teacher on the CPU.
//!
//! ```text
//! cargo run --release -p logitd --example teacher_forward -- MODEL [BATCH] [LEN] [REPEAT] [sample|forward] [kept|f32]
//! ```
//! `kept` loads a GGUF file as `--dtype auto` does (its quantized matrices
//! kept); `f32` (the default) widens every weight as `--dtype f32`.
//! Runs REPEAT packed batches of BATCH sequences × LEN tokens (deterministic
//! token ids) through the model (and, with `sample`, through the chunked LM head
//! and the sampler at k = 256 for every position), then prints one JSON line:
//! tokens/s of the forward (and of forward + head + sampling) and the peak
//! resident memory (VmHWM) of the process.

use std::{path::PathBuf, time::Instant};

use candle_core::{DType, Device};
use logitd::{
    model::{PackedBatch, Teacher},
    sampler::{Method, RowKey, RowQueries, SampledRows, SamplingParams},
    scoring::SamplerBackend,
};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    // As the `logitd` binary: freed tensor memory reused (`logitd::malloc`).
    logitd::malloc::keep_tensor_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: MODEL [BATCH] [LEN] [REPEAT] [sample]"))?,
    );
    let batch: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let len: usize = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let repeat: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let sample = args.get(4).is_some_and(|s| s == "sample");
    let kept = args.get(5).is_some_and(|s| s == "kept");

    let started = Instant::now();
    let teacher = if kept {
        Teacher::load_kept(&model, &Device::Cpu)?
    } else {
        Teacher::load(&model, &Device::Cpu, DType::F32)?
    };
    let load_s = started.elapsed().as_secs_f64();
    let rss_loaded = peak_rss_mib();
    let vocab = teacher.config().vocab_size as u64;
    let sequences: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..len).map(|p| ((s * 7919 + p * 104_729) as u64 % vocab.min(30_000)) as u32).collect()
        })
        .collect();
    let packed = PackedBatch::new(&sequences)?;
    let params = SamplingParams::new(Method::Sample, 256, 1.0)?;
    let rows: Vec<u32> = (0..packed.num_tokens() as u32).collect();
    let keys: Vec<RowKey> = (0..packed.num_tokens() as u32)
        .map(|i| RowKey { seed: 1, sequence: 0, position: i })
        .collect();
    let mut sampler = SamplerBackend::new(teacher.device(), vocab as usize, None)?;
    let (mut forward_s, mut head_s, mut entries) = (0.0, 0.0, 0usize);
    for _ in 0..repeat {
        let t = Instant::now();
        let hidden = teacher.hidden_states(&packed)?;
        forward_s += t.elapsed().as_secs_f64();
        if sample {
            let t = Instant::now();
            let mut out = SampledRows::new();
            sampler.sample(&teacher, &hidden, &rows, &keys, RowQueries::NONE, &params, &mut out)?;
            head_s += t.elapsed().as_secs_f64();
            entries += out.num_entries();
        }
    }
    let tokens = (packed.num_tokens() * repeat) as f64;
    println!(
        "{{\"model\": {:?}, \"served\": {:?}, \"threads\": {}, \"batch\": {batch}, \"len\": {len}, \"repeat\": {repeat}, \"load_s\": {load_s:.2}, \
         \"forward_tokens_per_s\": {:.1}, \"head_and_sample_tokens_per_s\": {}, \"distinct_ids_per_position\": {}, \
         \"peak_rss_after_load_mib\": {rss_loaded:.0}, \"peak_rss_mib\": {:.0}}}",
        model.display(),
        teacher.served_dtype(),
        candle_core::utils::get_num_threads(),
        tokens / forward_s,
        if sample { format!("{:.1}", tokens / head_s) } else { "null".into() },
        if sample { format!("{:.1}", entries as f64 / tokens) } else { "null".into() },
        peak_rss_mib(),
    );
    Ok(())
}
