//! The CUDA sampling kernel and the teacher on CUDA, against the CPU reference.
//! Built only with the `cuda` feature and run on a GPU machine
//! (`tests/gpu/run.sh` runs it, with compute-sanitizer too).
//!
//! - Random logits (teacher-like, flat, partly masked) for V = 32,000,
//!   151,936 and 262,144 in f32, f16 and bf16, sample and top-k: the kernel's
//!   ids and counts against the CPU sampler on the same values (the dtype's
//!   values widened to f32, exactly what the kernel reads). Sample mode must
//!   differ only by draws moved between ids adjacent in the CDF (a threshold
//!   at a boundary), and on at most max(1, rows / 1000) rows; top-k must agree
//!   on every row. log p and lse within 1 ulp.
//! - Real-teacher logits, from the file in `LOGITD_REAL_LOGITS` (a safetensors
//!   file with `logits` [rows, V], made by the `dump_logits` example), when set.
//! - Ragged rows, ties and tiny vocabularies (every row with a finite logit),
//!   and, on purpose, a row of only -inf at tiny vocabularies.
//! - Rows with NaN, +inf or only -inf fail as on the CPU.
//! - The tiny fixture teachers on CUDA (f32 and bf16) against the CPU in f32,
//!   and `SamplerBackend::sample` on CUDA (the kernel) against the CPU sampler on the
//!   same logits.
//!
//! Every comparison prints a line `AGREEMENT ...` that tests/gpu/run.sh
//! gathers into its table, and at most 5 `DIFFER` lines (counts, no ids). The
//! inputs and the rules of a comparison are in `gpu_common/`, which
//! `gpu_cases.rs` checks on the CPU in every build.
#![cfg(feature = "cuda")]

mod gpu_common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gpu_common::{
    ALL_MASKED_ROW, RAGGED_DTYPES, RAGGED_ROWS, RAGGED_VOCABS, all_masked_logits, compare, keys,
    ragged_logits, ragged_params, random_logits,
};
use logitd::{
    model::{PackedBatch, Teacher},
    sampler::{
        CpuSampler, Method, RowKey, SampledRows, SamplerError, SamplingParams,
        gpu::{CudaSampler, GpuSampleError},
    },
    scoring::SamplerBackend,
};

fn cuda() -> Device {
    Device::new_cuda(0).expect("this test needs a CUDA GPU (build with --features cuda)")
}

fn cuda_sampler(dev: &Device) -> CudaSampler {
    let Device::Cuda(d) = dev else { unreachable!() };
    CudaSampler::new(d).expect("loading the sampling kernel")
}

/// Samples `z` (f32 on the host) on the GPU in `dtype` and on the CPU from the
/// same dtype's values; returns (gpu, cpu, the values the CPU saw).
fn both(
    dev: &Device,
    gpu: &mut CudaSampler,
    z: &[f32],
    vocab: usize,
    dtype: DType,
    params: &SamplingParams,
    keys: &[RowKey],
) -> (SampledRows, SampledRows, Vec<f32>) {
    let rows = keys.len();
    let t = Tensor::from_slice(z, (rows, vocab), dev).unwrap().to_dtype(dtype).unwrap();
    let mut g = SampledRows::new();
    gpu.sample(&t, params, keys, &mut g).unwrap();
    let seen = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut c = SampledRows::new();
    CpuSampler::new().sample_rows(&seen, vocab, params, keys, &mut c).unwrap();
    (g, c, seen)
}

#[test]
fn kernel_agrees_with_the_reference_on_random_logits() {
    let dev = cuda();
    let mut gpu = cuda_sampler(&dev);
    let rows =
        std::env::var("LOGITD_GPU_TEST_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    for vocab in [32_000usize, 151_936, 262_144] {
        let z = random_logits(rows, vocab, vocab as u64);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (k, t) in [(256u32, 1.0f32), (256, 0.7), (4096, 1.0), (1, 1.0)] {
                let rows = if k == 256 && t == 1.0 { rows } else { rows.min(512) };
                let params = SamplingParams::new(Method::Sample, k, t).unwrap();
                let (g, c, seen) =
                    both(&dev, &mut gpu, &z[..rows * vocab], vocab, dtype, &params, &keys(rows, 5));
                let a = compare(&g, &c, &seen, vocab, t);
                a.print(&format!("sample V={vocab} dtype={dtype:?} k={k} T={t}"));
                for r in 0..g.num_rows() {
                    assert_eq!(g.row(r).counts.iter().sum::<u32>(), k, "row {r}: counts sum to k");
                }
                assert!(a.sample_ok(), "rows beyond a CDF boundary, or too many at one: {a:?}");
                assert!(a.logprob_ulps <= 1 && a.lse_ulps <= 1, "{a:?}");
            }
            let params = SamplingParams::new(Method::TopK, 256, 1.0).unwrap();
            let n = rows.min(1024);
            let (g, c, seen) =
                both(&dev, &mut gpu, &z[..n * vocab], vocab, dtype, &params, &keys(n, 5));
            let a = compare(&g, &c, &seen, vocab, 1.0);
            a.print(&format!("topk V={vocab} dtype={dtype:?} k=256"));
            assert_eq!(a.identical, a.rows, "top-k rows must be identical");
            assert!(a.logprob_ulps <= 1 && a.lse_ulps <= 1, "{a:?}");
        }
    }
}

#[test]
fn kernel_handles_ragged_rows_ties_and_tiny_vocabularies() {
    let dev = cuda();
    let mut gpu = cuda_sampler(&dev);
    // Odd sizes (no vector loads, partial tiles), ties for top-k, k > V; every
    // row has a finite logit (gpu_cases.rs checks that on the CPU).
    for vocab in RAGGED_VOCABS {
        let z = ragged_logits(vocab);
        for dtype in RAGGED_DTYPES {
            for params in ragged_params() {
                let (g, c, seen) =
                    both(&dev, &mut gpu, &z, vocab, dtype, &params, &keys(RAGGED_ROWS, 1));
                let a = compare(&g, &c, &seen, vocab, 1.0);
                a.print(&format!(
                    "ragged V={vocab} dtype={dtype:?} {:?} k={}",
                    params.method(),
                    params.num_samples()
                ));
                assert_eq!(a.other, 0, "{a:?}");
                if params.method() == Method::TopK {
                    assert_eq!(a.identical, a.rows, "{a:?}");
                }
            }
        }
    }
}

/// A row of only -inf at tiny vocabularies, on purpose: the kernel fails with
/// AllMasked as the CPU does, and keeps the rows before it, which are the CPU's.
#[test]
fn bad_rows_all_masked_at_tiny_vocabularies_fail_as_on_the_cpu() {
    let dev = cuda();
    let mut gpu = cuda_sampler(&dev);
    for vocab in [1usize, 2, 7, 257] {
        let z = all_masked_logits(vocab);
        for dtype in RAGGED_DTYPES {
            for params in ragged_params() {
                let what = format!(
                    "all-masked row V={vocab} dtype={dtype:?} {:?} k={}",
                    params.method(),
                    params.num_samples()
                );
                let t = Tensor::from_slice(&z, (RAGGED_ROWS, vocab), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let seen = t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let mut g = SampledRows::new();
                let e = gpu.sample(&t, &params, &keys(RAGGED_ROWS, 1), &mut g).unwrap_err();
                let mut c = SampledRows::new();
                let ce = CpuSampler::new()
                    .sample_rows(&seen, vocab, &params, &keys(RAGGED_ROWS, 1), &mut c)
                    .unwrap_err();
                let GpuSampleError::Sampler(ge) = e else { panic!("{what}: {e}") };
                assert_eq!(ge, SamplerError::AllMasked, "{what}");
                assert_eq!(ce, SamplerError::AllMasked, "{what}");
                assert_eq!(g.num_rows(), ALL_MASKED_ROW, "{what}: the rows before it are kept");
                let a = compare(&g, &c, &seen, vocab, 1.0);
                a.print(&what);
                assert_eq!(a.other, 0, "{what}: {a:?}");
                if params.method() == Method::TopK {
                    assert_eq!(a.identical, a.rows, "{what}: {a:?}");
                }
            }
        }
    }
}

#[test]
fn bad_rows_fail_as_on_the_cpu() {
    let dev = cuda();
    let mut gpu = cuda_sampler(&dev);
    let vocab = 5000;
    let params = SamplingParams::new(Method::Sample, 64, 1.0).unwrap();
    for (bad, want) in
        [(Some((4321, f32::NAN)), "nan"), (Some((17, f32::INFINITY)), "inf"), (None, "masked")]
    {
        let mut z = random_logits(4, vocab, 3);
        match bad {
            Some((i, v)) => {
                z[2 * vocab + i] = v;
                z[2 * vocab + i + 100] = v; // the first one is reported
            }
            None => z[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY),
        }
        let t = Tensor::from_slice(&z, (4, vocab), &dev).unwrap();
        let mut g = SampledRows::new();
        let e = gpu.sample(&t, &params, &keys(4, 1), &mut g).unwrap_err();
        let mut c = SampledRows::new();
        let ce =
            CpuSampler::new().sample_rows(&z, vocab, &params, &keys(4, 1), &mut c).unwrap_err();
        let GpuSampleError::Sampler(ge) = e else { panic!("{want}: {e}") };
        match (&ge, &ce) {
            (
                SamplerError::NonFiniteLogit { index: a, value: x },
                SamplerError::NonFiniteLogit { index: b, value: y },
            ) => {
                assert_eq!(a, b, "{want}");
                assert_eq!(x.to_bits(), y.to_bits(), "{want}");
            }
            _ => assert_eq!(ge, ce, "{want}"),
        }
        assert_eq!(g.num_rows(), 2, "{want}: the rows before the bad one are kept");
        let a = compare(&g, &c, &z, vocab, 1.0);
        assert_eq!(a.identical, 2, "{want}: {a:?}");
    }
}

#[test]
fn kernel_agrees_on_real_teacher_logits() {
    let paths = match std::env::var_os("LOGITD_REAL_LOGITS") {
        Some(p) if !p.is_empty() => p,
        _ if std::env::var_os("LOGITD_GPU_SKIP_REAL_LOGITS").is_some() => {
            println!(
                "AGREEMENT real skipped: LOGITD_GPU_SKIP_REAL_LOGITS is set, so the kernel was NOT \
                 compared on real-teacher logits"
            );
            eprintln!("WARNING: real-teacher logits skipped (LOGITD_GPU_SKIP_REAL_LOGITS)");
            return;
        }
        _ => panic!(
            "LOGITD_REAL_LOGITS is not set: point it at the dump_logits files (tests/gpu/README.md), \
             or set LOGITD_GPU_SKIP_REAL_LOGITS=1 to run without them"
        ),
    };
    let dev = cuda();
    let mut gpu = cuda_sampler(&dev);
    for path in std::env::split_paths(&paths) {
        let file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let logits = file["logits"].to_dtype(DType::F32).unwrap();
        let (rows, vocab) = logits.dims2().unwrap();
        let z = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (k, t) in [(256u32, 1.0f32), (256, 0.7), (4096, 1.0)] {
                let params = SamplingParams::new(Method::Sample, k, t).unwrap();
                let (g, c, seen) = both(&dev, &mut gpu, &z, vocab, dtype, &params, &keys(rows, 77));
                let a = compare(&g, &c, &seen, vocab, t);
                a.print(&format!("real {name} V={vocab} dtype={dtype:?} k={k} T={t}"));
                assert!(a.sample_ok(), "{a:?}");
            }
            let params = SamplingParams::new(Method::TopK, 256, 1.0).unwrap();
            let (g, c, seen) = both(&dev, &mut gpu, &z, vocab, dtype, &params, &keys(rows, 77));
            let a = compare(&g, &c, &seen, vocab, 1.0);
            a.print(&format!("real {name} V={vocab} dtype={dtype:?} topk k=256"));
            assert_eq!(a.identical, a.rows);
        }
    }
}

/// The tiny fixtures: in the source tree this binary was built from, or, when
/// the binary was carried to another machine, under `server/` of the current
/// directory (tests/gpu/run.sh runs from the repository root).
fn fixtures() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    if built.exists() { built } else { PathBuf::from("server/tests/fixtures/tiny") }
}

fn fixture_batch(dir: &Path) -> PackedBatch {
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let mut sequences = vec![];
    for i in 0.. {
        let Some(tokens) = expected.get(&format!("tokens_{i}")) else { break };
        sequences.push(
            tokens.to_vec1::<i64>().unwrap().into_iter().map(|t| t as u32).collect::<Vec<_>>(),
        );
    }
    PackedBatch::new(&sequences).unwrap()
}

fn logits_of(teacher: &Teacher, batch: &PackedBatch) -> Vec<Vec<f32>> {
    let hidden = teacher.hidden_states(batch).unwrap();
    teacher.logits(&hidden).unwrap().to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap()
}

/// The teacher on CUDA (f32 and bf16) against the CPU in f32 on every tiny
/// fixture. f32 must agree to 1e-3; bf16 within bf16 tolerance, here taken as
/// max |Δ| ≤ 5% of the largest |logit| (bf16 keeps 8 significant bits, and each
/// layer rounds its activations).
#[test]
fn teacher_on_cuda_matches_the_cpu() {
    let dev = cuda();
    for name in [
        "llama",
        "llama3_rope",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "gemma3_multimodal",
    ] {
        let dir = fixtures().join(name);
        let batch = fixture_batch(&dir);
        let cpu = logits_of(&Teacher::load(&dir, &Device::Cpu, DType::F32).unwrap(), &batch);
        let scale = cpu.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for dtype in [DType::F32, DType::BF16] {
            let gpu = logits_of(&Teacher::load(&dir, &dev, dtype).unwrap(), &batch);
            let (mut worst, mut sum, mut n) = (0f32, 0f64, 0usize);
            for (g, c) in gpu.iter().flatten().zip(cpu.iter().flatten()) {
                let d = (g - c).abs();
                worst = worst.max(d);
                sum += f64::from(d);
                n += 1;
            }
            println!(
                "TEACHER {name} dtype={dtype:?} max_abs_diff={worst:e} mean_abs_diff={:e} max_abs_logit={scale}",
                sum / n as f64
            );
            let bound = if dtype == DType::F32 { 1e-3 } else { 0.05 * scale };
            assert!(worst <= bound, "{name} {dtype:?}: max |Δ| {worst} > {bound}");
        }
    }
}

/// `SamplerBackend::sample` on CUDA runs the head in chunks and samples each chunk on
/// the GPU; the rows must be the CPU sampler's rows of the same logits. The
/// reference's logits are computed chunk by chunk with the same row counts as
/// `SamplerBackend::sample` uses (cuBLAS does not promise the same bits for another
/// shape), and a sample row may still differ by draws moved across one CDF
/// boundary (the f64 sums run in another order), as in the kernel tests.
#[test]
fn teacher_sample_on_cuda_is_the_reference_on_the_same_logits() {
    let dev = cuda();
    let dir = fixtures().join("gemma2");
    let teacher = Teacher::load(&dir, &dev, DType::F32).unwrap();
    let batch = fixture_batch(&dir);
    let hidden = teacher.hidden_states(&batch).unwrap();
    let rows: Vec<u32> = (0..batch.num_tokens() as u32).rev().collect();
    let keys: Vec<RowKey> =
        rows.iter().map(|&p| RowKey { seed: 42, sequence: 3, position: p }).collect();
    let vocab = teacher.config().vocab_size;
    for params in [
        SamplingParams::new(Method::Sample, 256, 1.0).unwrap(),
        SamplingParams::new(Method::TopK, 7, 1.0).unwrap(),
    ] {
        for chunk in [1, 5, 1000] {
            let mut g = SampledRows::new();
            SamplerBackend::new(&dev, vocab, Some(chunk))
                .unwrap()
                .sample(
                    &teacher,
                    &hidden,
                    &rows,
                    &keys,
                    logitd::sampler::RowQueries::NONE,
                    &params,
                    &mut g,
                )
                .unwrap();
            let mut z = Vec::new();
            for part in rows.chunks(chunk) {
                let idx = Tensor::from_slice(part, part.len(), &dev).unwrap();
                let l = teacher.logits(&hidden.index_select(&idx, 0).unwrap()).unwrap();
                z.extend(
                    l.to_device(&Device::Cpu)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
            let mut c = SampledRows::new();
            CpuSampler::new().sample_rows(&z, vocab, &params, &keys, &mut c).unwrap();
            let a = compare(&g, &c, &z, vocab, 1.0);
            a.print(&format!("teacher.sample gemma2 {:?} chunk={chunk}", params.method()));
            assert_eq!(a.other, 0, "rows that differ beyond a CDF boundary: {a:?}");
            if params.method() == Method::TopK {
                assert_eq!(a.identical, a.rows, "top-k rows must be identical: {a:?}");
            }
        }
    }
}
