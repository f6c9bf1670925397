//! Response encoding: sampled rows → the columnar `SampledSequence` →
//! protobuf bytes (f32 values, and f16 packed), and the trainer's decode of
//! those bytes. One response of 4 sequences × 128 positions with 60 distinct ids
//! per position (SmolLM2-135M at k = 256 on English text draws 28–133).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use logitd::{
    response::{Asked, sampled_sequence},
    sampler::SampledRows,
};
use logitd_proto::v1::{SampleLogitsResponse, ValueEncoding};
use prost::Message;

const SEQUENCES: usize = 4;
const POSITIONS: usize = 128;
const IDS: usize = 60;

/// One sequence's rows: ascending ids, counts summing to 256, log-probabilities.
fn rows(salt: usize) -> SampledRows {
    let mut r = SampledRows { offsets: vec![0], ..SampledRows::new() };
    for p in 0..POSITIONS {
        let mut left = 256u32;
        for j in 0..IDS {
            let id = ((j * 811 + p * 13 + salt) % 800 + j * 800) as u32;
            let c = if j + 1 == IDS {
                left
            } else {
                (left / 8).max(1).min(left - (IDS - j - 1) as u32)
            };
            left -= c;
            r.token_ids.push(id);
            r.counts.push(c);
            r.logprobs.push(-0.05 * (j as f32 + 1.0) - (p % 7) as f32 * 0.01);
        }
        r.offsets.push(r.token_ids.len() as u32);
        r.lse.push(12.0 + p as f32 * 0.001);
    }
    r
}

fn response(all: Vec<SampledRows>, encoding: ValueEncoding) -> SampleLogitsResponse {
    SampleLogitsResponse {
        sequences: all
            .into_iter()
            .map(|r| sampled_sequence(r, Asked::samples(0), encoding))
            .collect(),
        seed: 7,
        model_id: "bench".into(),
        num_samples: 256,
        temperature: 1.0,
        method: 1,
        value_encoding: encoding as i32,
    }
}

fn bench(c: &mut Criterion) {
    let input: Vec<SampledRows> = (0..SEQUENCES).map(rows).collect();
    let mut group = c.benchmark_group("response");
    group.throughput(Throughput::Elements((SEQUENCES * POSITIONS) as u64));
    for (name, encoding) in [("f32", ValueEncoding::F32), ("f16", ValueEncoding::F16)] {
        let bytes = response(input.clone(), encoding).encode_to_vec();
        eprintln!(
            "{name}: {} bytes, {:.1} per position",
            bytes.len(),
            bytes.len() as f64 / (SEQUENCES * POSITIONS) as f64
        );
        group.bench_function(format!("encode {name} (rows -> bytes)"), |b| {
            b.iter_batched(
                || input.clone(),
                |rows| black_box(response(rows, encoding).encode_to_vec()),
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("decode {name} (bytes -> message)"), |b| {
            b.iter(|| black_box(SampleLogitsResponse::decode(black_box(bytes.as_slice())).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
