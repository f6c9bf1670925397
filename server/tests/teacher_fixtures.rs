//! Our packed-batch forward against Hugging Face transformers: tiny random
//! models of every architecture (fixtures made by tests/fixtures/make_fixtures.py),
//! logits at every position of every sequence.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use logitd::model::{PackedBatch, Teacher};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// Bound on |our logit − transformers' logit|, about 5× the largest measured.
/// Measured 2026-12-07 on an AMD EPYC with AVX2 and no AVX-512 (so candle's
/// AVX2 matmul kernels, as on CI; the default build picks its AVX-512 kernels
/// at run time on CPUs that have them, summing in another order), max |diff|:
/// llama 1.7e-6, llama3_rope 1.7e-6, qwen2 1.9e-6, qwen3 1.4e-6, mistral
/// 1.4e-6, gemma2 2.4e-6, gemma3 3.2e-6, gemma3_multimodal 4.8e-6 (each test
/// prints its own with `--nocapture`).
const BOUND: f32 = 2.5e-5;

/// Packs the fixture's three sequences into one batch and compares the logits
/// at every position with transformers' (each sequence run alone there).
fn check(name: &str) {
    let dir = fixtures().join(name);
    let teacher =
        Teacher::load(&dir, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let mut sequences = vec![];
    let mut want = vec![];
    for i in 0.. {
        let Some(tokens) = expected.get(&format!("tokens_{i}")) else { break };
        let tokens: Vec<u32> =
            tokens.to_vec1::<i64>().unwrap().into_iter().map(|t| t as u32).collect();
        sequences.push(tokens);
        want.push(expected[&format!("logits_{i}")].to_vec2::<f32>().unwrap());
    }
    assert!(sequences.len() >= 2, "{name}: fixture has {} sequences", sequences.len());
    let batch = PackedBatch::new(&sequences).unwrap();
    let hidden = teacher.hidden_states(&batch).unwrap();
    let got = teacher.logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (s, want) in want.iter().enumerate() {
        let range = batch.sequence(s);
        assert_eq!(range.len(), want.len());
        for (p, (g, w)) in got[range].iter().zip(want).enumerate() {
            for (v, (g, w)) in g.iter().zip(w).enumerate() {
                let d = (g - w).abs();
                worst = worst.max(d);
                assert!(
                    d <= BOUND,
                    "{name}: sequence {s} position {p} id {v}: {g} vs transformers {w} (|diff| {d:e} > {BOUND:e})"
                );
            }
        }
    }
    // The logits must not be trivially small: a model that ignored its input
    // would fail here rather than pass by accident.
    let spread = want.iter().flatten().flatten().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.5, "{name}: fixture logits are degenerate (max |z| = {spread})");
    eprintln!(
        "{name}: max |diff| = {worst:e} (bound {BOUND:e}) over {} positions",
        batch.num_tokens()
    );
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn llama_with_llama3_rope_scaling_matches_transformers() {
    check("llama3_rope");
}

#[test]
fn qwen2_matches_transformers() {
    check("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check("qwen3");
}

#[test]
fn mistral_with_sliding_window_matches_transformers() {
    check("mistral");
}

#[test]
fn gemma2_matches_transformers() {
    check("gemma2");
}

#[test]
fn gemma3_matches_transformers() {
    check("gemma3");
}

#[test]
fn gemma3_language_model_inside_the_multimodal_checkpoint_matches_transformers() {
    check("gemma3_multimodal");
}

#[test]
fn unsupported_model_type_and_missing_tensors_are_named() {
    let tmp = std::env::temp_dir().join(format!("logitd-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("config.json"), r#"{"model_type": "gpt_neox"}"#).unwrap();
    let e = Teacher::load(&tmp, &Device::Cpu, DType::F32).err().expect("unsupported");
    assert!(e.to_string().contains("`gpt_neox` is not supported"), "{e}");
    // A valid config whose weights lack a tensor: the error names it.
    let src = fixtures().join("llama");
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let kept: std::collections::HashMap<String, Tensor> =
        weights.into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    candle_core::safetensors::save(&kept, tmp.join("model.safetensors")).unwrap();
    let e = Teacher::load(&tmp, &Device::Cpu, DType::F32).err().expect("missing tensor");
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
