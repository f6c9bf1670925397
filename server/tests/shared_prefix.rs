//! Shared-prefix packing: sequences of one batch that begin with the same
//! tokens (G rollouts of one prompt) have that prefix run once by the forward
//! (`PackedBatch::sharing_prefixes`, the fused CPU attention), and get what
//! they get packed whole:
//! - the hidden state of every position within 2e-6 of its token's largest
//!   value (the fused attention's bound, as `attention_tiles.rs` holds the
//!   kernel to the tiles: the continuation's scores and values are summed in
//!   two matmuls instead of one, so not bit for bit),
//! - the same draws (ids and counts) and log-probabilities within 1e-5,
//!
//! on every fixture architecture (sliding windows: mistral, gemma2, gemma3;
//! soft-caps: gemma2) and on SmolLM2, for the cases that could go wrong:
//! prefixes that differ in their last token, groups of one, a sequence that is
//! the whole prefix, two groups in one batch, a group split across two
//! batches, and positions asked for inside and after the prefix.

use std::{path::Path, time::Instant};

use candle_core::{DType, Device};
use logitd::{
    engine::Engine,
    model::{PackedBatch, Teacher},
    queue::WorkItem,
    sampler::{Method, RowKey, SampledRows, SamplingParams},
};

/// The tiled attention (what a GPU runs) against the fused kernel, relative
/// to each token's largest value (`attention_tiles.rs`).
const TILES_BOUND: f32 = 2e-6;

fn fixture(name: &str) -> Teacher {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny").join(name);
    Teacher::load(&dir, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A token sequence of `len` ids below `vocab`, from `seed`.
fn tokens(seed: u32, len: usize, vocab: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (seed.wrapping_mul(2_654_435_761) ^ (i * 40_503 + 7)) % vocab).collect()
}

fn concat(a: &[u32], b: &[u32]) -> Vec<u32> {
    a.iter().chain(b).copied().collect()
}

/// The batch of every case (`prefix` tokens shared by rollouts), with the
/// first position each sequence asks for.
fn cases(vocab: u32, prefix: usize) -> Vec<(Vec<u32>, u32)> {
    let p1 = tokens(1, prefix, vocab);
    let p2 = tokens(2, prefix + 3, vocab);
    let p = prefix as u32;
    let mut last = p1.clone();
    *last.last_mut().unwrap() = (last[prefix - 1] + 1) % vocab;
    vec![
        // Group 1: three rollouts (completions only, all, from mid-prefix).
        (concat(&p1, &tokens(10, 9, vocab)), p),
        (concat(&p1, &tokens(11, 1, vocab)), 0),
        (concat(&p1, &tokens(12, 20, vocab)), p / 2),
        // Alone: nothing in common with anything.
        (tokens(3, prefix + 5, vocab), 0),
        // Group 2, interleaved with group 1.
        (concat(&p2, &tokens(13, 6, vocab)), p + 3),
        // The whole prefix of group 1, nothing after it.
        (p1.clone(), 0),
        (concat(&p2, &tokens(14, 2, vocab)), 0),
        // Group 1's prefix but its last token: its group shares one token
        // less (6 × 23 beats 5 × 24 tokens saved).
        (concat(&last, &tokens(15, 4, vocab)), p - 1),
        (concat(&p1, &tokens(16, 3, vocab)), p),
        // The whole prefix of group 2, nothing after it.
        (p2.clone(), 1),
    ]
}

fn work(seqs: &[(Vec<u32>, u32)], k: u32) -> Vec<WorkItem> {
    let params = SamplingParams::new(Method::Sample, k, 1.0).unwrap();
    seqs.iter()
        .enumerate()
        .map(|(i, (t, first))| {
            let key = RowKey { seed: 77 + i as u64, sequence: i as u32, position: 0 };
            WorkItem::new(t.clone(), *first, params, key, None, Instant::now()).0
        })
        .collect()
}

fn assert_same_rows(name: &str, what: &str, a: &SampledRows, b: &SampledRows) {
    assert_eq!(a.offsets, b.offsets, "{name}: {what}: offsets");
    assert_eq!(a.token_ids, b.token_ids, "{name}: {what}: sampled ids");
    assert_eq!(a.counts, b.counts, "{name}: {what}: counts");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.logprobs), bits(&b.logprobs), "{name}: {what}: log-probabilities");
    assert_eq!(bits(&a.lse), bits(&b.lse), "{name}: {what}: lse");
}

/// Hidden states of every position, shared against whole, bit for bit.
fn compare_hidden(name: &str, teacher: &Teacher, seqs: &[Vec<u32>], min_prefix: usize) {
    let shared = PackedBatch::sharing_prefixes(seqs, min_prefix).unwrap();
    let whole = PackedBatch::new(seqs).unwrap();
    assert!(shared.tokens_shared() > 0, "{name}: the cases share prefixes");
    let hs = teacher.hidden_states(&shared).unwrap().to_vec2::<f32>().unwrap();
    let hw = teacher.hidden_states(&whole).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(hs.len(), shared.num_tokens());
    // Group 1: six sequences share prefix − 1 tokens; group 2: three share
    // prefix + 3, the last of them all prefix.
    let prefix = 2 * min_prefix;
    assert_eq!(shared.tokens_shared(), 5 * (prefix - 1) + 2 * (prefix + 3), "{name}");
    assert!(shared.sequence(9).is_empty(), "{name}: sequence 9 is its group's prefix");
    for (s, seq) in seqs.iter().enumerate() {
        for p in 0..seq.len() {
            let (g, w) = (&hs[shared.row(s, p)], &hw[whole.row(s, p)]);
            assert!(g == w, "{name}: sequence {s} position {p}: shared and whole differ");
        }
    }
}

/// The cases through the engine with sharing, in one batch and with the
/// batch split in two (group 1 across both), against the engine without.
fn check(name: &str, teacher: Teacher, prefix: usize, k: u32) {
    let vocab = teacher.config().vocab_size as u32;
    let seqs = cases(vocab, prefix);
    let plain: Vec<Vec<u32>> = seqs.iter().map(|(t, _)| t.clone()).collect();
    let min = prefix / 2;
    compare_hidden(name, &teacher, &plain, min);
    let mut engine = Engine::new(teacher, None).unwrap();
    engine.set_min_shared_prefix(0);
    let want = engine.score(&work(&seqs, k)).unwrap();
    engine.set_min_shared_prefix(min);
    let one = engine.score(&work(&seqs, k)).unwrap();
    let items = work(&seqs, k);
    let (a, b) = items.split_at(2);
    let mut two = engine.score(a).unwrap();
    two.extend(engine.score(b).unwrap());
    for (s, w) in want.iter().enumerate() {
        assert_eq!(w.num_rows(), seqs[s].0.len() - seqs[s].1 as usize, "{name}: sequence {s}");
        assert_same_rows(name, &format!("one batch, sequence {s}"), &one[s], w);
        assert_same_rows(name, &format!("two batches, sequence {s}"), &two[s], w);
    }
}

macro_rules! fixture_tests {
    ($($test:ident: $name:literal,)*) => {$(
        #[test]
        fn $test() {
            check($name, fixture($name), 24, 64);
        }
    )*};
}

fixture_tests! {
    llama_shares_prefixes: "llama",
    llama3_rope_shares_prefixes: "llama3_rope",
    qwen2_shares_prefixes: "qwen2",
    qwen3_shares_prefixes: "qwen3",
    mistral_sliding_window_shares_prefixes: "mistral",
    gemma2_softcap_and_window_share_prefixes: "gemma2",
    gemma3_shares_prefixes: "gemma3",
    gemma3_multimodal_shares_prefixes: "gemma3_multimodal",
}

/// SmolLM2 (the demo teacher, Q4_1 GGUF served in f32) with 64-token prefixes,
/// k = 256.
#[test]
fn smollm2_shares_prefixes() {
    let path = logitd::model::demo_teacher();
    assert!(path.exists(), "{} is missing: run tests/fetch-teachers.sh", path.display());
    let teacher = Teacher::load(&path, &Device::Cpu, DType::F32).unwrap();
    check("SmolLM2", teacher, 64, 256);
}

/// Off the fused kernel (the tiles a GPU runs) a batch that shares a prefix
/// runs whole: every position within the tiles' bound of the fused forward
/// packed whole (a prefix position is read from one member's copy, whose tiles
/// may round differently from another member's).
#[test]
fn the_tiled_attention_runs_a_shared_batch_whole() {
    let mut teacher = fixture("gemma2");
    let seqs: Vec<Vec<u32>> = cases(96, 24).into_iter().map(|(t, _)| t).collect();
    let whole = PackedBatch::new(&seqs).unwrap();
    let fused = teacher.hidden_states(&whole).unwrap().to_vec2::<f32>().unwrap();
    teacher.set_fused_cpu_attention(None).unwrap();
    assert!(!teacher.shares_prefixes());
    let shared = PackedBatch::sharing_prefixes(&seqs, 12).unwrap();
    assert!(shared.shares_prefixes());
    let tiled = teacher.hidden_states(&shared).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(tiled.len(), shared.num_tokens());
    for (s, seq) in seqs.iter().enumerate() {
        for p in 0..seq.len() {
            let (g, w) = (&tiled[shared.row(s, p)], &fused[whole.row(s, p)]);
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (g, w) in g.iter().zip(w) {
                let d = (g - w).abs() / scale;
                assert!(d <= TILES_BOUND, "sequence {s} position {p}: {g} tiled vs {w} fused");
            }
        }
    }
}
