//! The chunked LM head + sampler over a packed batch: per sequence, the same
//! samples as the sequence run alone, whatever the chunk size.

use std::path::Path;

use candle_core::{DType, Device};
use logitd::{
    model::{PackedBatch, Teacher},
    sampler::{Method, RowKey, RowQueries, SampledRows, SamplingParams},
    scoring::SamplerBackend,
};

fn teacher(name: &str) -> Teacher {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny").join(name);
    Teacher::load(&dir, &Device::Cpu, DType::F32).unwrap()
}

/// Samples every position of every sequence; sequence s is keyed by its own
/// seed 100 + s so its samples do not depend on its place in the batch.
fn sample_all(t: &Teacher, sequences: &[Vec<u32>], chunk_rows: usize) -> Vec<SampledRows> {
    let batch = PackedBatch::new(sequences).unwrap();
    let hidden = t.hidden_states(&batch).unwrap();
    let params = SamplingParams::new(Method::Sample, 64, 1.0).unwrap();
    let mut rows = vec![];
    let mut keys = vec![];
    for (s, seq) in sequences.iter().enumerate() {
        let start = batch.sequence(s).start as u32;
        for p in 0..seq.len() as u32 {
            rows.push(start + p);
            keys.push(RowKey::for_sequence(0, s as u32, Some(100 + seq[0] as u64), p));
        }
    }
    let mut out = SampledRows::new();
    let vocab = t.config().vocab_size;
    let mut sampler = SamplerBackend::new(t.device(), vocab, Some(chunk_rows)).unwrap();
    sampler.sample(t, &hidden, &rows, &keys, RowQueries::NONE, &params, &mut out).unwrap();
    // Split per sequence.
    let mut per = vec![];
    let mut r = 0;
    for seq in sequences {
        let mut one = SampledRows::new();
        for _ in 0..seq.len() {
            let row = out.row(r);
            for ((&id, &c), &lp) in row.token_ids.iter().zip(row.counts).zip(row.logprobs) {
                one.token_ids.push(id);
                one.counts.push(c);
                one.logprobs.push(lp);
            }
            one.offsets.push(one.token_ids.len() as u32);
            one.lse.push(row.lse);
            r += 1;
        }
        per.push(one);
    }
    per
}

fn assert_same(a: &SampledRows, b: &SampledRows, what: &str) {
    assert_eq!(a.offsets, b.offsets, "{what}");
    assert_eq!(a.token_ids, b.token_ids, "{what}");
    assert_eq!(a.counts, b.counts, "{what}");
    for (x, y) in a.logprobs.iter().zip(&b.logprobs).chain(a.lse.iter().zip(&b.lse)) {
        assert!((x - y).abs() < 1e-5, "{what}: {x} vs {y}");
    }
}

#[test]
fn packed_sequences_get_the_samples_they_get_alone() {
    for name in ["llama", "gemma3", "mistral"] {
        let t = teacher(name);
        let sequences: Vec<Vec<u32>> = vec![
            (0..13).map(|i| (i * 7 + 3) % 96).collect(),
            (0..2).map(|i| (i * 11 + 5) % 96).collect(),
            (0..9).map(|i| (i * 5 + 40) % 96).collect(),
        ];
        let packed = sample_all(&t, &sequences, 1024);
        for (s, seq) in sequences.iter().enumerate() {
            let alone = sample_all(&t, std::slice::from_ref(seq), 1024);
            assert_same(&packed[s], &alone[0], &format!("{name} sequence {s}"));
        }
    }
}

#[test]
fn head_chunk_size_does_not_change_the_samples() {
    let t = teacher("gemma2");
    let sequences: Vec<Vec<u32>> = vec![(0..17).map(|i| (i * 13) % 96).collect(), vec![4, 5, 6]];
    let reference = sample_all(&t, &sequences, 1024);
    for chunk in [1, 3, 7] {
        let got = sample_all(&t, &sequences, chunk);
        for s in 0..2 {
            assert_same(&got[s], &reference[s], &format!("chunk {chunk} sequence {s}"));
        }
    }
}
