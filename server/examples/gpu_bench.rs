//! GPU benchmarks (`cuda` feature), run by `tests/gpu/run.sh` on a GPU machine.
//! Each prints JSON lines that run.sh turns into its table.
//!
//! ```text
//! gpu_bench preflight
//! gpu_bench sampler [REPS]
//! gpu_bench forward MODEL_DIR SEQUENCES LENGTH REPS
//! gpu_bench engine MODEL_DIR SEQUENCES LENGTH DURATION_S
//! ```
//!
//! - `preflight`: what the GPU run checks before it spends time: the device
//!   (name, compute capability, SMs), the kernel's PTX loads (the driver
//!   compiles it here, so an old driver fails now), one small launch per dtype
//!   and method runs (how many of its rows are the CPU sampler's is printed as
//!   data and judged by the run's `kernel` stage, not here), a bf16 matrix
//!   product runs (cuBLAS and candle's kernels load); registers, spills and
//!   resident blocks per SM of each entry point of the kernel. It fails only
//!   when something does not load or launch.
//! - `sampler`: the device-to-device copy bandwidth of `cuMemcpyDtoD` (1 GiB,
//!   read + write counted), then the sampling kernel on random teacher-like
//!   logits for V = 32,000, 151,936 and 262,144 in bf16, f16 and f32, k = 256
//!   (sample and top-k), in chunks of 32 Mi logits (the CPU's chunk) and of
//!   256 Mi (the GPU's): the kernel's own time per row (CUDA events), the whole call
//!   per row (keys up, launch, the mapped results decoded into rows), and the
//!   floor: one read of the row's bytes at the copy's read+write bandwidth.
//! - `forward`: the teacher in bf16 on cuda:0, SEQUENCES × LENGTH random
//!   tokens per batch: forward to hidden states, and forward, chunked LM head
//!   and sampling (k = 256) of every position; tokens/s and MFU (useful FLOPs:
//!   2 per weight per token, plus causal attention; peak from the device name
//!   or LOGITD_PEAK_TFLOPS).
//! - `engine`: `Engine::score` on the same batches for DURATION_S seconds (the
//!   server's engine without queue and gRPC), tokens/s.

use std::{path::Path, time::Instant};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use logitd::{
    engine::Engine,
    model::{PackedBatch, Teacher},
    queue::WorkItem,
    sampler::{CpuSampler, Method, RowKey, SampledRows, SamplingParams, gpu::CudaSampler},
    scoring::SamplerBackend,
};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn main() -> anyhow::Result<()> {
    // As the `logitd` binary: freed tensor memory reused (`logitd::malloc`).
    logitd::malloc::keep_tensor_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("preflight") => preflight(),
        Some("sampler") => sampler(&args[1..]),
        Some("forward") => forward(&args[1..]),
        Some("engine") => engine(&args[1..]),
        _ => bail!(
            "usage: gpu_bench preflight | sampler [REPS] | forward DIR S L REPS | engine DIR S L SECS"
        ),
    }
}

fn cuda() -> anyhow::Result<(Device, candle_core::CudaDevice)> {
    let dev = Device::new_cuda(0).context("cuda:0")?;
    let Device::Cuda(d) = &dev else { unreachable!() };
    let d = d.clone();
    Ok((dev, d))
}

fn device_name(d: &candle_core::CudaDevice) -> String {
    d.cuda_stream().context().name().unwrap_or_else(|_| "unknown GPU".into())
}

/// Teacher-like logits: a Zipf-shaped head in random id order over noise.
fn teacher_like(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut z = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let scale: f32 = rng.random_range(0.8..2.0);
        for i in 0..vocab {
            let rank = (i.wrapping_mul(2_654_435_761) ^ r) % vocab;
            z.push(-1.1 * ((rank + 1) as f32).ln() * scale + rng.random_range(-1.0f32..1.0));
        }
    }
    z
}

fn preflight() -> anyhow::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    let (dev, d) = cuda()?;
    let ctx = d.cuda_stream().context().clone();
    let attr = |a| ctx.attribute(a).map_err(|e| anyhow::anyhow!("{e:?}"));
    let (major, minor, sms) = (
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
    );
    let name = device_name(&d);
    println!(
        "{{\"bench\":\"device\",\"device\":{name:?},\"compute_capability\":\"{major}.{minor}\",\"sms\":{sms}}}"
    );
    // Loading the module makes the driver compile the PTX for this GPU.
    let mut gpu = CudaSampler::new(&d).context("loading the sampling kernel's PTX")?;
    for (params, vocab) in [
        (SamplingParams::new(Method::Sample, 256, 1.0)?, 262_144),
        (SamplingParams::new(Method::Sample, 4096, 1.0)?, 262_144),
        (SamplingParams::new(Method::TopK, 256, 1.0)?, 262_144),
    ] {
        for r in gpu.resources(&params, vocab)? {
            println!(
                "{{\"bench\":\"kernel_resources\",\"kernel\":\"{}\",\"method\":\"{:?}\",\"k\":{},\"vocab\":{vocab},\
                 \"registers\":{},\"local_bytes\":{},\"static_shared_bytes\":{},\"blocks_per_sm\":{}}}",
                r.name,
                params.method(),
                params.num_samples(),
                r.registers,
                r.local_bytes,
                r.static_shared_bytes,
                r.blocks_per_sm
            );
        }
    }
    // One small launch per dtype, against the CPU on the same values.
    let (rows, vocab) = (8usize, 32_000usize);
    let z = teacher_like(rows, vocab, 3);
    let keys: Vec<RowKey> =
        (0..rows as u32).map(|p| RowKey { seed: 9, sequence: 1, position: p }).collect();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for params in [
            SamplingParams::new(Method::TopK, 64, 1.0)?,
            SamplingParams::new(Method::Sample, 64, 1.0)?,
        ] {
            let t = Tensor::from_slice(&z, (rows, vocab), &dev)?.to_dtype(dtype)?;
            let mut g = SampledRows::new();
            gpu.sample(&t, &params, &keys, &mut g)?;
            let seen = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut c = SampledRows::new();
            CpuSampler::new().sample_rows(&seen, vocab, &params, &keys, &mut c)?;
            let same = (0..rows)
                .filter(|&r| {
                    g.row(r).token_ids == c.row(r).token_ids && g.row(r).counts == c.row(r).counts
                })
                .count();
            println!(
                "{{\"bench\":\"preflight_launch\",\"dtype\":\"{dtype:?}\",\"method\":\"{:?}\",\"rows\":{rows},\"identical\":{same}}}",
                params.method()
            );
            // Only data here: the kernel stage judges it (top-k rows must all
            // be the CPU's, report.py --check-preflight), so that one
            // disagreeing row does not stop the run before the tests that say
            // more about it. Load and launch errors (the `?`s) fail here.
        }
    }
    // cuBLAS and candle's own kernels: a bf16 matrix product and a softmax.
    let a = Tensor::randn(0f32, 1.0, (256, 512), &dev)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (512, 128), &dev)?.to_dtype(DType::BF16)?;
    let p = candle_nn::ops::softmax_last_dim(&a.matmul(&b)?.to_dtype(DType::F32)?)?;
    let sum = p.sum_all()?.to_scalar::<f32>()?;
    if (sum - 256.0).abs() > 0.1 {
        bail!("a bf16 matmul + softmax on the GPU summed to {sum}, not 256");
    }
    println!("{{\"bench\":\"preflight_cublas\",\"ok\":true}}");
    Ok(())
}

fn sampler(args: &[String]) -> anyhow::Result<()> {
    let reps: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let (dev, d) = cuda()?;
    let name = device_name(&d);
    // Copy bandwidth: 1 GiB device to device.
    let stream = d.cuda_stream();
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    stream.memcpy_dtod(&src, &mut dst)?;
    stream.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    stream.synchronize()?;
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    let copy = bytes as f64 / secs;
    drop((src, dst));
    println!(
        "{{\"bench\":\"copy\",\"device\":{name:?},\"bytes\":{bytes},\"copy_gb_s\":{:.1},\"read_write_gb_s\":{:.1}}}",
        copy / 1e9,
        2.0 * copy / 1e9
    );
    let read_bw = 2.0 * copy;
    let mut gpu = CudaSampler::new(&d)?;
    gpu.set_timing(true);
    for vocab in [32_000usize, 151_936, 262_144] {
        // The CPU's chunk (32 Mi logits) and the GPU's (256 Mi).
        for rows in [(1usize << 25) / vocab, (1usize << 28) / vocab] {
            let z = teacher_like(rows, vocab, vocab as u64 + rows as u64);
            let base = Tensor::from_slice(&z, (rows, vocab), &dev)?;
            drop(z);
            let keys: Vec<RowKey> =
                (0..rows as u32).map(|p| RowKey { seed: 1, sequence: 0, position: p }).collect();
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let logits = base.to_dtype(dtype)?;
                for method in [Method::Sample, Method::TopK] {
                    let params = SamplingParams::new(method, 256, 1.0)?;
                    let mut out = SampledRows::new();
                    for _ in 0..3 {
                        out = SampledRows::new();
                        gpu.sample(&logits, &params, &keys, &mut out)?;
                    }
                    let mut kernel = Vec::new();
                    let t = Instant::now();
                    for _ in 0..reps {
                        out = SampledRows::new();
                        gpu.sample(&logits, &params, &keys, &mut out)?;
                        kernel.push(gpu.last_kernel_seconds().expect("timing is on"));
                    }
                    let total = t.elapsed().as_secs_f64() / reps as f64;
                    kernel.sort_by(f64::total_cmp);
                    let k_med = kernel[kernel.len() / 2];
                    let row_bytes = (vocab * dtype.size_in_bytes()) as f64;
                    let floor = row_bytes / read_bw;
                    let distinct = out.num_entries() as f64 / out.num_rows() as f64;
                    println!(
                        "{{\"bench\":\"sampler\",\"device\":{name:?},\"method\":\"{method:?}\",\"dtype\":\"{dtype:?}\",\
                         \"vocab\":{vocab},\"rows\":{rows},\"k\":256,\"kernel_us_per_row\":{:.4},\
                         \"call_us_per_row\":{:.4},\"floor_us_per_row\":{:.4},\"efficiency\":{:.3},\
                         \"distinct_per_row\":{distinct:.1}}}",
                        k_med / rows as f64 * 1e6,
                        total / rows as f64 * 1e6,
                        floor * 1e6,
                        floor * rows as f64 / k_med,
                    );
                }
            }
        }
    }
    // The CPU reference on the same logits, for scale (one row chunk, V = 262,144).
    let vocab = 262_144;
    let rows = 128;
    let z = teacher_like(rows, vocab, 7);
    let keys: Vec<RowKey> =
        (0..rows as u32).map(|p| RowKey { seed: 1, sequence: 0, position: p }).collect();
    let params = SamplingParams::new(Method::Sample, 256, 1.0)?;
    let mut cpu = CpuSampler::new();
    let t = Instant::now();
    let mut out = SampledRows::new();
    cpu.sample_rows(&z, vocab, &params, &keys, &mut out)?;
    println!(
        "{{\"bench\":\"cpu_sampler\",\"vocab\":{vocab},\"rows\":{rows},\"threads\":{},\"us_per_row\":{:.2}}}",
        candle_core::utils::get_num_threads(),
        t.elapsed().as_secs_f64() / rows as f64 * 1e6
    );
    Ok(())
}

/// Useful FLOPs per token of the forward (without the LM head) and of the head.
fn flops_per_token(t: &Teacher, len: usize) -> (f64, f64) {
    let c = t.config();
    let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let per_layer_weights =
        h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * c.intermediate_size;
    let layers = c.num_layers();
    // Causal attention: QK^T and PV over (len + 1) / 2 keys on average.
    let attention = 4.0 * (nh * hd) as f64 * (len as f64 + 1.0) / 2.0;
    let forward = layers as f64 * (2.0 * per_layer_weights as f64 + attention);
    let head = 2.0 * (h * c.vocab_size) as f64;
    (forward, head)
}

/// Dense bf16 peak of the GPU, TFLOP/s.
fn peak_tflops(name: &str) -> Option<f64> {
    if let Ok(v) = std::env::var("LOGITD_PEAK_TFLOPS") {
        return v.parse().ok();
    }
    let n = name.to_ascii_uppercase();
    if n.contains("H200") || (n.contains("H100") && (n.contains("SXM") || n.contains("HBM3"))) {
        Some(989.4)
    } else if n.contains("H100") && n.contains("NVL") {
        Some(835.0)
    } else if n.contains("H100") {
        Some(756.0) // PCIe
    } else if n.contains("A100") {
        Some(312.0)
    } else if n.contains("L4") {
        Some(121.0)
    } else {
        None
    }
}

fn random_batch(sequences: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..sequences).map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()
}

fn forward(args: &[String]) -> anyhow::Result<()> {
    let [dir, s, l, reps] = args else { bail!("forward MODEL_DIR SEQUENCES LENGTH REPS") };
    let (sequences, len, reps): (usize, usize, usize) = (s.parse()?, l.parse()?, reps.parse()?);
    let (dev, d) = cuda()?;
    let name = device_name(&d);
    let teacher = Teacher::load(Path::new(dir), &dev, DType::BF16)?;
    let vocab = teacher.config().vocab_size;
    let batch = PackedBatch::new(&random_batch(sequences, len, vocab, 3))?;
    let tokens = batch.num_tokens();
    let rows: Vec<u32> = (0..tokens as u32).collect();
    let keys: Vec<RowKey> =
        rows.iter().map(|&p| RowKey { seed: 1, sequence: 0, position: p }).collect();
    let params = SamplingParams::new(Method::Sample, 256, 1.0)?;
    let mut sampler = SamplerBackend::new(&dev, vocab, None)?;
    let chunk = sampler.chunk_rows();
    for _ in 0..2 {
        let h = teacher.hidden_states(&batch)?;
        let mut out = SampledRows::new();
        sampler.sample(
            &teacher,
            &h,
            &rows,
            &keys,
            logitd::sampler::RowQueries::NONE,
            &params,
            &mut out,
        )?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        let h = teacher.hidden_states(&batch)?;
        drop(h);
    }
    dev.synchronize()?;
    let fwd = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        let h = teacher.hidden_states(&batch)?;
        let mut out = SampledRows::new();
        sampler.sample(
            &teacher,
            &h,
            &rows,
            &keys,
            logitd::sampler::RowQueries::NONE,
            &params,
            &mut out,
        )?;
    }
    dev.synchronize()?;
    let full = t.elapsed().as_secs_f64() / reps as f64;
    let (f_fwd, f_head) = flops_per_token(&teacher, len);
    let peak = peak_tflops(&name);
    let mfu = |flops: f64, secs: f64| match peak {
        Some(p) => format!("{:.4}", flops * tokens as f64 / secs / (p * 1e12)),
        None => "null".into(),
    };
    println!(
        "{{\"bench\":\"forward\",\"device\":{name:?},\"model\":{:?},\"sequences\":{sequences},\"length\":{len},\
         \"tokens_per_s_forward\":{:.1},\"tokens_per_s_forward_head_sample\":{:.1},\
         \"mfu_forward\":{},\"mfu_forward_head\":{},\"peak_tflops\":{},\"head_chunk_rows\":{chunk}}}",
        Path::new(dir).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        tokens as f64 / fwd,
        tokens as f64 / full,
        mfu(f_fwd, fwd),
        mfu(f_fwd + f_head, full),
        peak.map_or("null".to_string(), |p| p.to_string()),
    );
    Ok(())
}

fn engine(args: &[String]) -> anyhow::Result<()> {
    let [dir, s, l, secs] = args else { bail!("engine MODEL_DIR SEQUENCES LENGTH DURATION_S") };
    let (sequences, len, secs): (usize, usize, f64) = (s.parse()?, l.parse()?, secs.parse()?);
    let (dev, d) = cuda()?;
    let name = device_name(&d);
    let teacher = Teacher::load(Path::new(dir), &dev, DType::BF16)?;
    let vocab = teacher.config().vocab_size;
    let mut engine = Engine::new(teacher, None)?;
    let params = SamplingParams::new(Method::Sample, 256, 1.0)?;
    let items = |r: u64| -> Vec<WorkItem> {
        random_batch(sequences, len, vocab, r)
            .into_iter()
            .enumerate()
            .map(|(i, tokens)| WorkItem {
                tokens,
                first_position: 0,
                params,
                seed: r,
                key_sequence: i as u32,
                deadline: None,
                enqueued: Instant::now(),
                scores: Default::default(),
                reply: tokio::sync::oneshot::channel().0,
            })
            .collect()
    };
    for r in 0..2 {
        engine.score(&items(r))?;
    }
    let t = Instant::now();
    let mut batches = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        let batch = items(100 + batches);
        engine.score(&batch)?;
        batches += 1;
    }
    let elapsed = t.elapsed().as_secs_f64();
    println!(
        "{{\"bench\":\"engine\",\"device\":{name:?},\"model\":{:?},\"sequences\":{sequences},\"length\":{len},\
         \"batches\":{batches},\"tokens_per_s\":{:.1}}}",
        Path::new(dir).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        (batches as usize * sequences * len) as f64 / elapsed
    );
    Ok(())
}
