//! GGUF loading of every claimed architecture and quantisation type against
//! Hugging Face transformers loading the SAME file (which dequantises it with the
//! `gguf` package's numpy code, not candle's): tiny random-weight models
//! (fixtures/gguf/*.gguf, made by `make_fixtures.py --only gguf`), logits at every
//! position of three packed sequences.
//!
//! | file | architecture | tensor types |
//! | --- | --- | --- |
//! | llama_q4_0 | llama (q/k rows in llama.cpp's order) | Q4_0, Q8_0 embedding, F32 norms |
//! | qwen2_q8_0 | qwen2 (q/k/v biases, tied) | Q8_0, F32 biases and norms |
//! | qwen3_f16_q4_0 | qwen3 (q/k norms, head_dim 128 ≠ 64/2) | F16 attention, Q4_0 MLP, Q8_0 embedding, F32 output |
//! | gemma2_q8_0_q4_0 | gemma2 (1+w norms, sliding window, soft-caps) | Q8_0 attention, Q4_0 MLP, F16 embedding |
//! | llama_kquants | llama, hidden 256 | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (random valid blocks) |
//!
//! And the GGUF tokenizer rebuilt for the Llama 3 (`llama-bpe`) and Qwen 2/3
//! (`qwen2`) families: the fixture files carry a tiny byte-level BPE vocabulary
//! whose expected token ids come from the family's REAL `tokenizer.json`
//! pipeline (normaliser, pre-tokeniser, decoder, copied from the released
//! tokenizer) with that vocabulary, in `fixtures/gguf/tokenizer_cases.json`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, quantized::gguf_file::Content};
use logitd::model::{Arch, PackedBatch, Teacher};
use serde::Deserialize;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

/// Bound on |our logit − transformers' logit|, about 5× the largest measured
/// (as for the safetensors fixtures, teacher_fixtures.rs). Both sides compute in
/// f32 from the same dequantised weights; each test prints its max |diff|.
/// Measured 2026-12-07 on an AMD EPYC with AVX2 and no AVX-512 (candle's AVX2
/// matmul kernels, as on CI; CPUs with AVX-512 sum in another order): llama_q4_0
/// 2.1e-6, qwen3_f16_q4_0 2.6e-6, gemma2_q8_0_q4_0 3.8e-6, llama_kquants 5.5e-6,
/// qwen2_q8_0 6.2e-6.
const BOUND: f32 = 3.2e-5;

/// The tensor types of the file, by name (read with candle's GGUF reader).
fn tensor_types(path: &Path) -> BTreeMap<String, String> {
    let mut f = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut f).unwrap();
    content.tensor_infos.iter().map(|(n, t)| (n.clone(), format!("{:?}", t.ggml_dtype))).collect()
}

/// Loads `name`.gguf with logitd, widened to f32 and kept quantized, packs the
/// fixture's sequences into one batch and compares every logit with
/// transformers'.
fn check(name: &str, arch: Arch, want_types: &[(&str, &str)]) {
    let widened = check_as(name, arch, want_types, false);
    let kept = check_as(name, arch, want_types, true);
    // Kept quantized, each matrix is widened for its matmul into the layout
    // the f32 path holds, and the same gemm runs: the same bits.
    let differ = widened.iter().flatten().zip(kept.iter().flatten()).filter(|(a, b)| a != b);
    assert_eq!(differ.count(), 0, "{name}: logits kept quantized differ from the f32 path's");
}

/// One load (widened to f32, or kept quantized), checked against
/// transformers; its logits.
fn check_as(name: &str, arch: Arch, want_types: &[(&str, &str)], quantized: bool) -> Vec<Vec<f32>> {
    let path = dir().join(format!("{name}.gguf"));
    // The file really holds the quantisation types this test is named after.
    let types = tensor_types(&path);
    for (tensor, ty) in want_types {
        assert_eq!(types.get(*tensor).map(String::as_str), Some(*ty), "{name}: tensor {tensor}");
    }
    let teacher = if quantized {
        Teacher::load_kept(&path, &Device::Cpu)
    } else {
        Teacher::load(&path, &Device::Cpu, DType::F32)
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: served as {}", teacher.served_dtype());
    let bound = BOUND;
    if quantized {
        // Every matrix of a block type is kept so (F16/F32 ones are dense).
        let served = teacher.served_dtype();
        for (tensor, ty) in want_types {
            let ty = ty.to_lowercase().replace('k', "_k");
            let kept = served.split('/').next().unwrap().split('+').any(|t| t == ty);
            let matrix = !tensor.ends_with("norm.weight") && !tensor.ends_with(".bias");
            assert!(!matrix || kept || ty.starts_with('f'), "{name}: {tensor} {ty} in {served}");
        }
    }
    assert_eq!(teacher.config().arch, arch, "{name}");
    let expected = candle_core::safetensors::load(
        dir().join(format!("{name}.expected.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let mut sequences: Vec<Vec<u32>> = vec![];
    let mut want = vec![];
    for i in 0.. {
        let Some(tokens) = expected.get(&format!("tokens_{i}")) else { break };
        sequences.push(tokens.to_vec1::<i64>().unwrap().into_iter().map(|t| t as u32).collect());
        want.push(expected[&format!("logits_{i}")].to_vec2::<f32>().unwrap());
    }
    assert_eq!(sequences.len(), 3, "{name}: fixture sequences");
    let batch = PackedBatch::new(&sequences).unwrap();
    let hidden = teacher.hidden_states(&batch).unwrap();
    let got = teacher.logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
    let (mut worst, mut compared) = (0f32, 0usize);
    for (s, want) in want.iter().enumerate() {
        let range = batch.sequence(s);
        assert_eq!(range.len(), want.len(), "{name}: sequence {s} length");
        for (p, (g, w)) in got[range].iter().zip(want).enumerate() {
            assert_eq!(g.len(), w.len(), "{name}: vocabulary");
            for (v, (g, w)) in g.iter().zip(w).enumerate() {
                let d = (g - w).abs();
                worst = worst.max(d);
                compared += 1;
                assert!(
                    d <= bound,
                    "{name}: sequence {s} position {p} id {v}: {g} vs transformers {w} (|diff| {d:e} > {bound:e})"
                );
            }
        }
    }
    assert_eq!(compared, batch.num_tokens() * teacher.config().vocab_size);
    let spread = want.iter().flatten().flatten().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.5, "{name}: fixture logits are degenerate (max |z| = {spread})");
    eprintln!(
        "{name}: max |diff| = {worst:e} (bound {bound:e}, spread {spread}) over {} positions x {} ids",
        batch.num_tokens(),
        teacher.config().vocab_size
    );
    got
}

#[test]
fn llama_q4_0_matches_transformers() {
    check(
        "llama_q4_0",
        Arch::Llama,
        &[
            ("blk.0.attn_q.weight", "Q4_0"),
            ("blk.1.attn_k.weight", "Q4_0"),
            ("blk.0.ffn_down.weight", "Q4_0"),
            ("output.weight", "Q4_0"),
            ("token_embd.weight", "Q8_0"),
            ("blk.0.attn_norm.weight", "F32"),
        ],
    );
}

#[test]
fn qwen2_q8_0_matches_transformers() {
    check(
        "qwen2_q8_0",
        Arch::Qwen2,
        &[
            ("blk.0.attn_q.weight", "Q8_0"),
            ("blk.0.attn_q.bias", "F32"),
            ("blk.1.ffn_gate.weight", "Q8_0"),
            ("token_embd.weight", "Q8_0"),
        ],
    );
    let types = tensor_types(&dir().join("qwen2_q8_0.gguf"));
    assert!(!types.contains_key("output.weight"), "qwen2 fixture is tied");
}

#[test]
fn qwen3_f16_q4_0_matches_transformers() {
    check(
        "qwen3_f16_q4_0",
        Arch::Qwen3,
        &[
            ("blk.0.attn_q.weight", "F16"),
            ("blk.0.attn_output.weight", "F16"),
            ("blk.0.attn_q_norm.weight", "F32"),
            ("blk.1.ffn_up.weight", "Q4_0"),
            ("token_embd.weight", "Q8_0"),
            ("output.weight", "F32"),
        ],
    );
}

#[test]
fn gemma2_q8_0_q4_0_matches_transformers() {
    check(
        "gemma2_q8_0_q4_0",
        Arch::Gemma2,
        &[
            ("blk.0.attn_k.weight", "Q8_0"),
            ("blk.2.ffn_down.weight", "Q4_0"),
            ("blk.0.post_ffw_norm.weight", "F32"),
            ("token_embd.weight", "F16"),
        ],
    );
}

#[derive(Deserialize)]
struct Family {
    gguf_file: String,
    pre: String,
    sentences: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn families() -> BTreeMap<String, Family> {
    serde_json::from_str(&std::fs::read_to_string(dir().join("tokenizer_cases.json")).unwrap())
        .unwrap()
}

/// The tokenizer logitd rebuilds from the GGUF metadata gives the family's token
/// ids on every fixture sentence, and decodes them back as the family does.
fn check_tokenizer(family: &str, pre: &str) {
    let all = families();
    let fx = &all[family];
    assert_eq!(fx.pre, pre, "{family}: tokenizer.ggml.pre of the fixture");
    let tokenizer = logitd::model::load_tokenizer(&dir().join(&fx.gguf_file), None)
        .unwrap_or_else(|e| panic!("{family}: {e}"));
    assert!(fx.sentences.len() >= 8, "{family}: {} sentences", fx.sentences.len());
    let mut distinct = BTreeSet::new();
    for (i, s) in fx.sentences.iter().enumerate() {
        let enc = tokenizer.encode(s.text.as_str(), false).unwrap();
        // Only positions are reported, never ids or text (the fixture file has them).
        let got = enc.get_ids();
        let first = got.iter().zip(&s.ids).position(|(a, b)| a != b);
        assert!(
            got == s.ids.as_slice(),
            "{family}: sentence {i}: {} ids, expected {}; first difference at position {:?}",
            got.len(),
            s.ids.len(),
            first.or(Some(got.len().min(s.ids.len())))
        );
        assert_eq!(
            tokenizer.decode(got, false).unwrap(),
            s.decoded,
            "{family}: sentence {i} decodes differently"
        );
        distinct.extend(got.iter().copied());
    }
    eprintln!(
        "{family}: {} sentences, {} distinct ids, all equal to the real pipeline's",
        fx.sentences.len(),
        distinct.len()
    );
}

#[test]
fn llama3_tokenizer_rebuilt_from_gguf_matches_the_llama3_pipeline() {
    check_tokenizer("llama3", "llama-bpe");
}

#[test]
fn qwen_tokenizer_rebuilt_from_gguf_matches_the_qwen2_pipeline() {
    check_tokenizer("qwen2", "qwen2");
}

#[test]
fn gemma2_gguf_sentencepiece_tokenizer_needs_an_explicit_file() {
    let e = logitd::model::load_tokenizer(&dir().join("gemma2_q8_0_q4_0.gguf"), None)
        .expect_err("a sentencepiece vocabulary is not rebuilt");
    assert!(e.to_string().contains("pass --tokenizer"), "{e}");
}

#[test]
fn unknown_gguf_pre_tokenizer_is_refused_by_name() {
    use candle_core::quantized::gguf_file::{Value, write};
    // A byte-level BPE vocabulary whose pre-tokenizer logitd does not rebuild
    // (Mistral's tekken): refused, naming the value, rather than split wrongly.
    let path = std::env::temp_dir().join(format!("logitd-tekken-{}.gguf", std::process::id()));
    let s = |x: &str| Value::String(x.to_string());
    let model = s("gpt2");
    let pre = s("tekken");
    let tokens = Value::Array(vec![s("a"), s("b"), s("ab")]);
    let merges = Value::Array(vec![s("a b")]);
    let mut f = std::fs::File::create(&path).unwrap();
    write(
        &mut f,
        &[
            ("tokenizer.ggml.model", &model),
            ("tokenizer.ggml.pre", &pre),
            ("tokenizer.ggml.tokens", &tokens),
            ("tokenizer.ggml.merges", &merges),
        ],
        &[],
    )
    .unwrap();
    drop(f);
    let e = logitd::model::load_tokenizer(&path, None).expect_err("tekken is not rebuilt");
    std::fs::remove_file(&path).unwrap();
    let msg = e.to_string();
    assert!(msg.contains("\"tekken\"") && msg.contains("pass --tokenizer"), "{msg}");
}

#[test]
fn llama_k_quants_match_transformers() {
    // Random valid K-quant blocks (the gguf package has no K-quant quantiser):
    // candle's dequantisation of every K type against gguf's numpy one.
    check(
        "llama_kquants",
        Arch::Llama,
        &[
            ("blk.0.attn_q.weight", "Q2K"),
            ("blk.0.attn_k.weight", "Q3K"),
            ("blk.0.attn_v.weight", "Q4K"),
            ("blk.1.attn_output.weight", "Q5K"),
            ("blk.1.ffn_gate.weight", "Q6K"),
            ("token_embd.weight", "Q6K"),
            ("output.weight", "Q2K"),
        ],
    );
}
