//! Batch forming: the queue's FIFO packing of whole sequences (push a request's
//! items, take batches of ≤ 8,192 tokens), and the packed batch the model runs
//! (concatenated tokens, positions restarting per sequence).

use std::{hint::black_box, time::Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use logitd::{
    model::PackedBatch,
    queue::{BatchQueue, WorkItem},
    sampler::{Method, SamplingParams},
};

/// `n` sequences of 64…1,023 tokens (a fixed pseudo-random mix).
fn lengths(n: usize) -> Vec<usize> {
    (0..n).map(|i| 64 + (i * 7919) % 960).collect()
}

fn work(lengths: &[usize]) -> Vec<WorkItem> {
    let params = SamplingParams::new(Method::Sample, 256, 1.0).unwrap();
    let now = Instant::now();
    lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| WorkItem {
            tokens: vec![i as u32; len],
            first_position: 0,
            params,
            seed: i as u64,
            key_sequence: 0,
            deadline: None,
            enqueued: now,
            scores: Default::default(),
            reply: tokio::sync::oneshot::channel().0,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let lens = lengths(256);
    let tokens: usize = lens.iter().sum();
    let mut group = c.benchmark_group("packing");
    // 256 sequences (≈ 140 k tokens) queued as 32 requests of 8, then taken in
    // batches of ≤ 8,192 tokens until the queue is empty.
    group.bench_function(format!("queue push+take, 256 sequences, {tokens} tokens"), |b| {
        b.iter_batched(
            || work(&lens),
            |items| {
                let mut q = BatchQueue::new(usize::MAX, 8192);
                let mut items = items.into_iter();
                for _ in 0..32 {
                    q.push(items.by_ref().take(8).collect()).unwrap();
                }
                let now = Instant::now();
                let mut batches = 0;
                while !q.is_empty() {
                    black_box(q.take_batch(now, |_, _| {}));
                    batches += 1;
                }
                batches
            },
            BatchSize::SmallInput,
        )
    });
    // One packed batch of 8,192 tokens (16 × 512), as the engine builds it.
    let seqs: Vec<Vec<u32>> =
        (0..16).map(|s| (0..512).map(|p| (s * 512 + p) % 49_152).collect()).collect();
    group.bench_function("PackedBatch::new 16 x 512 tokens", |b| {
        b.iter(|| black_box(PackedBatch::new(black_box(&seqs)).unwrap().num_tokens()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
