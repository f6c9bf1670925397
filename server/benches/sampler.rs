//! Sampler cost per row at V ∈ {32,000; 151,936; 262,144}, k = 256, next to one
//! plain read of the same rows (the memory floor). Rows cycle through a 64 MiB
//! buffer so large vocabularies come from memory, not cache, as in the engine.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use logitd::sampler::{CpuSampler, Method, RowKey, SampledRows, SamplingParams};

const BUFFER_BYTES: usize = 64 << 20;

/// Zipf-like logits with a noisy floor, like a language model's.
fn logits(vocab: usize, rows: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..vocab * rows)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state >> 40) as f32 / (1u64 << 24) as f32;
            let rank = ((i % vocab) * 7919) % vocab;
            -1.1 * ((rank + 1) as f32).ln() + noise
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for vocab in [32_000usize, 151_936, 262_144] {
        let rows = (BUFFER_BYTES / (vocab * 4)).max(2);
        let data = logits(vocab, rows);
        let mut group = c.benchmark_group(format!("V={vocab}"));
        let mut r = 0usize;
        group.bench_function("read (memory floor)", |b| {
            b.iter(|| {
                r = (r + 1) % rows;
                let row = &data[r * vocab..(r + 1) * vocab];
                black_box(row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)))
            })
        });
        for (name, method) in [("sample k=256", Method::Sample), ("top-k k=256", Method::TopK)] {
            let params = SamplingParams::new(method, 256, 1.0).unwrap();
            let mut sampler = CpuSampler::new();
            let mut out = SampledRows::new();
            let mut position = 0u32;
            group.bench_function(name, |b| {
                b.iter(|| {
                    position = position.wrapping_add(1);
                    let r = position as usize % rows;
                    out = SampledRows::new();
                    let key = RowKey { seed: 1, sequence: 0, position };
                    sampler
                        .sample_row(&data[r * vocab..(r + 1) * vocab], &params, key, &mut out)
                        .unwrap();
                    black_box(out.num_entries())
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
