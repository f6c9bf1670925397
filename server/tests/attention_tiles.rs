//! Attention is computed in query tiles of at most
//! `DEFAULT_ATTENTION_TILE_ELEMENTS` (32 Mi) scores. On the fixtures one tile
//! holds a whole sequence, so these tests shrink the bound
//! (`Teacher::set_attention_tile_elements`) until every sequence is cut into
//! many tiles, down to one query row per tile, and check on every tiny model
//! (sliding windows included: mistral, gemma2, gemma3) and on packed batches
//! of several sequences that
//! - the hidden states equal those of one tile per sequence to within 2e-6 of
//!   each token's largest hidden value (measured: at most 1.2e-6; not bit for
//!   bit, since the tiles' matmuls and softmax rows have other shapes and may
//!   sum in another order), and
//! - the logits still match transformers' (the fixtures' expected logits,
//!   computed by transformers on each sequence alone) within `TRANSFORMERS_BOUND`.
//!
//! On the CPU in f32 the server runs the fused attention kernel instead
//! (`model/attention_cpu.rs`); the same two checks hold it, at its default
//! block of query rows and at blocks of 1, 3 and 16 rows.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use logitd::model::{DEFAULT_ATTENTION_TILE_ELEMENTS, DEFAULT_QUERY_BLOCK, PackedBatch, Teacher};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// Tiles per sequence of `len` queries under `bound` scores with `heads`
/// heads, as the tiling rule says (rows = bound / (heads · len), at least 1).
/// Logits against transformers: about 5× the largest error measured, 4.8e-6
/// (every fixture at every tile size, AVX2-only AMD EPYC, 2026-12-07; the same
/// bound as `teacher_fixtures.rs`, which compares the one-tile forward).
const TRANSFORMERS_BOUND: f32 = 2.5e-5;

fn tiles_of(len: usize, heads: usize, bound: usize) -> usize {
    let rows = (bound / (heads * len)).clamp(1, len);
    len.div_ceil(rows)
}

/// The hidden states `hidden` (of `batch`, computed with `label`) against
/// `one_tile`'s, within 2e-6 of each token's largest value, and their logits
/// against transformers' (`want`) within [`TRANSFORMERS_BOUND`].
fn compare(
    name: &str,
    label: &str,
    teacher: &Teacher,
    batch: &PackedBatch,
    hidden: &Tensor,
    one_tile: &[Vec<f32>],
    want: &[Vec<Vec<f32>>],
) {
    let got = hidden.to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    let mut identical = true;
    for (t, (g, w)) in got.iter().zip(one_tile).enumerate() {
        // Relative to the largest value of the token's hidden state: the
        // tiles' matmuls and softmax rows have other shapes, so they may
        // sum in another order (a few f32 ulps per layer).
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (d, (g, w)) in g.iter().zip(w).enumerate() {
            identical &= g.to_bits() == w.to_bits();
            let diff = (g - w).abs() / scale;
            worst = worst.max(diff);
            assert!(
                diff <= 2e-6,
                "{name}: {label}: token {t} dim {d}: {g} vs one tile {w} (largest |value| {scale})"
            );
        }
    }
    // And it still matches transformers.
    let logits = teacher.logits(hidden).unwrap().to_vec2::<f32>().unwrap();
    let mut worst_tf = 0f32;
    for (s, want) in want.iter().enumerate() {
        let range = batch.sequence(s);
        assert_eq!(range.len(), want.len());
        for (p, (g, w)) in logits[range].iter().zip(want).enumerate() {
            for (v, (g, w)) in g.iter().zip(w).enumerate() {
                let d = (g - w).abs();
                worst_tf = worst_tf.max(d);
                assert!(
                    d <= TRANSFORMERS_BOUND,
                    "{name}: {label}: sequence {s} position {p} id {v}: {g} vs transformers {w} \
                     (|diff| {d:e}, bound {TRANSFORMERS_BOUND:e})"
                );
            }
        }
    }
    eprintln!(
        "{name}: {label}, {} sequences ({} tokens): max diff to one tile {worst:e} of the largest \
         value ({}), max |diff| to transformers {worst_tf:e}",
        batch.num_sequences(),
        batch.num_tokens(),
        if identical { "bit for bit" } else { "not bit for bit" }
    );
}

fn check(name: &str) {
    let dir = fixtures().join(name);
    let mut teacher =
        Teacher::load(&dir, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(teacher.attention_tile_elements(), DEFAULT_ATTENTION_TILE_ELEMENTS);
    // On the CPU in f32 the fused kernel runs by default.
    assert_eq!(teacher.fused_cpu_attention(), Some(DEFAULT_QUERY_BLOCK));
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let vocab = teacher.config().vocab_size as u32;
    let heads = teacher.config().num_heads;
    // The fixture's sequences (with transformers' logits), then longer ones
    // that cross the sliding windows (W = 4) many times, and a 1-token one.
    let mut sequences: Vec<Vec<u32>> = vec![];
    let mut want = vec![];
    for i in 0.. {
        let Some(tokens) = expected.get(&format!("tokens_{i}")) else { break };
        sequences.push(tokens.to_vec1::<i64>().unwrap().into_iter().map(|t| t as u32).collect());
        want.push(expected[&format!("logits_{i}")].to_vec2::<f32>().unwrap());
    }
    assert!(want.len() >= 2, "{name}: fixture has {} sequences", want.len());
    sequences.push((0..40u32).map(|p| (p * 37 + 11) % vocab).collect());
    sequences.push(vec![5 % vocab]);
    sequences.push((0..29u32).map(|p| (p * p * 7 + 3) % vocab).collect());
    let batch = PackedBatch::new(&sequences).unwrap();
    let lens: Vec<usize> = (0..batch.num_sequences()).map(|s| batch.sequence(s).len()).collect();
    let fused = teacher.hidden_states(&batch).unwrap();

    // The tiles of tensor ops (what a GPU runs): the default bound holds each
    // of these sequences in one tile.
    teacher.set_fused_cpu_attention(None).unwrap();
    assert!(lens.iter().all(|&l| tiles_of(l, heads, DEFAULT_ATTENTION_TILE_ELEMENTS) == 1));
    let one_tile = teacher.hidden_states(&batch).unwrap().to_vec2::<f32>().unwrap();
    let again = teacher.hidden_states(&batch).unwrap().to_vec2::<f32>().unwrap();
    assert!(again == one_tile, "{name}: the same forward twice differs");

    // From one query row per tile (bound 1) to a few rows per tile.
    for bound in [1, heads * 40, heads * 40 * 3, heads * 29 * 5, heads * 40 * 7 + 1] {
        teacher.set_attention_tile_elements(bound);
        let tiles: usize = lens.iter().map(|&l| tiles_of(l, heads, bound)).sum();
        assert!(
            tiles >= 2 * lens.len(),
            "{name}: bound {bound} gives only {tiles} tiles for {} sequences",
            lens.len()
        );
        let hidden = teacher.hidden_states(&batch).unwrap();
        let label = format!("tiles of at most {bound} scores ({tiles} tiles)");
        compare(name, &label, &teacher, &batch, &hidden, &one_tile, &want);
    }

    // The fused CPU kernel, at the default block (one block per sequence
    // here) and at blocks of 1, 3 and 16 query rows.
    let label = format!("fused, blocks of {DEFAULT_QUERY_BLOCK} rows");
    compare(name, &label, &teacher, &batch, &fused, &one_tile, &want);
    for block in [1, 3, 16] {
        teacher.set_fused_cpu_attention(Some(block)).unwrap();
        let hidden = teacher.hidden_states(&batch).unwrap();
        let label = format!("fused, blocks of {block} rows");
        compare(name, &label, &teacher, &batch, &hidden, &one_tile, &want);
    }
}

#[test]
fn llama_many_tiles_equal_one_tile() {
    check("llama");
}

#[test]
fn llama3_rope_many_tiles_equal_one_tile() {
    check("llama3_rope");
}

#[test]
fn qwen2_many_tiles_equal_one_tile() {
    check("qwen2");
}

#[test]
fn qwen3_many_tiles_equal_one_tile() {
    check("qwen3");
}

#[test]
fn mistral_sliding_window_many_tiles_equal_one_tile() {
    check("mistral");
}

#[test]
fn gemma2_alternating_window_many_tiles_equal_one_tile() {
    check("gemma2");
}

#[test]
fn gemma3_many_tiles_equal_one_tile() {
    check("gemma3");
}

#[test]
fn gemma3_multimodal_many_tiles_equal_one_tile() {
    check("gemma3_multimodal");
}
