//! Checkpoints stored in bf16 or f16 (tiny random models made by
//! tests/fixtures/make_fixtures.py --only half) against Hugging Face
//! transformers, which computed each twice: loaded in float32 (the stored
//! values widened exactly, f32 math) and loaded in the stored dtype (its own
//! half-precision math).
//!
//! - Kept as stored (`--dtype auto` on the CPU): 16-bit matrices, f32
//!   activations and accumulation. Widening bf16/f16 to f32 is exact, so the
//!   answers must be those of f32 math: transformers in float32 within the
//!   f32 bound of the tiny fixtures, and our own f32 path bit for bit.
//! - `--dtype bf16` / `f16` (every activation rounded to 16 bits) against
//!   transformers in the same dtype: see [`half_bound`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use logitd::model::{PackedBatch, Teacher};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/half").join(name)
}

/// The fixture's sequences and transformers' logits for them: float32 math
/// and the stored dtype's math.
struct Expected {
    sequences: Vec<Vec<u32>>,
    f32_math: Vec<Vec<Vec<f32>>>,
    half_math: Vec<Vec<Vec<f32>>>,
}

fn expected(name: &str) -> Expected {
    let e =
        candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let mut x = Expected { sequences: vec![], f32_math: vec![], half_math: vec![] };
    for i in 0.. {
        let Some(tokens) = e.get(&format!("tokens_{i}")) else { break };
        x.sequences.push(tokens.to_vec1::<i64>().unwrap().into_iter().map(|t| t as u32).collect());
        x.f32_math.push(e[&format!("logits_f32_{i}")].to_vec2::<f32>().unwrap());
        x.half_math.push(e[&format!("logits_half_{i}")].to_vec2::<f32>().unwrap());
    }
    assert!(x.sequences.len() >= 2, "{name}: {} sequences", x.sequences.len());
    x
}

/// The teacher's logits for `sequences` packed in one batch, by sequence.
fn logits(teacher: &Teacher, sequences: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let batch = PackedBatch::new(sequences).unwrap();
    let hidden = teacher.hidden_states(&batch).unwrap();
    let all = teacher.logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
    (0..sequences.len()).map(|s| all[batch.sequence(s)].to_vec()).collect()
}

/// max |a − b| over every logit (the shapes must agree).
fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (a, b) in a.iter().zip(b) {
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(b) {
                assert!(a.is_finite(), "non-finite logit {a}");
                worst = worst.max((a - b).abs());
            }
        }
    }
    worst
}

/// The f32 bound of the tiny fixtures (tests/teacher_fixtures.rs): f32 math
/// in another summation order.
const F32_BOUND: f32 = 2.5e-5;

/// Bound on |ours − transformers| when both compute in 16 bits: each rounds
/// every activation and weight product to the dtype in its own order, so
/// neither is closer to exact math than the other. The bound is twice the
/// distance of transformers' own half math from f32 math on the same fixture
/// (measured per fixture at the time it is checked), plus 1% of the largest
/// |logit| for the one ulp of bf16 at that size (2^-8 ≈ 0.4%) that the
/// final rounding can add on each side.
fn half_bound(x: &Expected) -> f32 {
    let spread = x.f32_math.iter().flatten().flatten().fold(0f32, |m, v| m.max(v.abs()));
    2.0 * max_diff(&x.half_math, &x.f32_math) + 0.01 * spread
}

fn check(name: &str, stored: &str, half: DType) {
    let dir = fixture(name);
    let x = expected(name);
    let spread = x.f32_math.iter().flatten().flatten().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.5, "{name}: fixture logits are degenerate (max |z| = {spread})");

    let kept = Teacher::load_kept(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(kept.matrix_types(), stored, "{name}: the matrices stay {stored}");
    assert_eq!(kept.served_dtype(), format!("{stored}/f32-acc"));
    let got = logits(&kept, &x.sequences);
    let d = max_diff(&got, &x.f32_math);
    eprintln!(
        "{name}: kept {stored} vs transformers float32: max |diff| {d:e} (bound {F32_BOUND:e})"
    );
    assert!(d <= F32_BOUND, "{name}: kept {stored} is {d:e} from transformers in float32");

    let widened = Teacher::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(widened.served_dtype(), "f32");
    let f32_logits = logits(&widened, &x.sequences);
    assert!(
        got.iter()
            .flatten()
            .flatten()
            .zip(f32_logits.iter().flatten().flatten())
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{name}: kept {stored} and --dtype f32 must give the same logits bit for bit"
    );

    let narrow = Teacher::load(&dir, &Device::Cpu, half).unwrap();
    let got = logits(&narrow, &x.sequences);
    let d = max_diff(&got, &x.half_math);
    let (bound, theirs) = (half_bound(&x), max_diff(&x.half_math, &x.f32_math));
    eprintln!(
        "{name}: --dtype {} vs transformers in {}: max |diff| {d:e} (bound {bound:e}; \
         transformers' own {} math is {theirs:e} from f32 math; ours is {:e})",
        half.as_str(),
        half.as_str(),
        half.as_str(),
        max_diff(&got, &x.f32_math),
    );
    assert!(d <= bound, "{name}: --dtype {} is {d:e} from transformers in it", half.as_str());
}

#[test]
fn llama_bf16_kept_and_in_bf16_match_transformers() {
    check("llama_bf16", "bf16", DType::BF16);
}

#[test]
fn qwen2_bf16_kept_and_in_bf16_match_transformers() {
    check("qwen2_bf16", "bf16", DType::BF16);
}

#[test]
fn gemma3_bf16_kept_and_in_bf16_match_transformers() {
    check("gemma3_bf16", "bf16", DType::BF16);
}

#[test]
fn qwen3_f16_kept_and_in_f16_match_transformers() {
    check("qwen3_f16", "f16", DType::F16);
}
