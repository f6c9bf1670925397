//! Server sampler → wire response → client targets → loss, across the crates.

use candle_core::{Device, Tensor};
use logitd::{
    response::{Asked, sampled_sequence},
    sampler::{CpuSampler, Method, RowKey, SampledRows, SamplingParams},
};
use logitd_client::{LossOptions, TeacherTargets, distill_loss};
use logitd_proto::v1::{SampleLogitsResponse, SamplingMethod, ValueEncoding};
use prost::Message;

const VOCAB: usize = 3000;
const POSITIONS: usize = 5;

fn teacher_logits() -> Vec<f32> {
    (0..VOCAB * POSITIONS)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 100.0 - ((i % VOCAB) as f32).sqrt() / 8.0)
        .collect()
}

fn sampled(temperature: f32) -> SampledRows {
    let params = SamplingParams::new(Method::Sample, 256, temperature).unwrap();
    let keys: Vec<RowKey> =
        (0..POSITIONS as u32).map(|p| RowKey::for_sequence(7, 0, None, p + 2)).collect();
    let mut rows = SampledRows::new();
    CpuSampler::new().sample_rows(&teacher_logits(), VOCAB, &params, &keys, &mut rows).unwrap();
    rows
}

fn through_the_wire(
    rows: &SampledRows,
    encoding: ValueEncoding,
    temperature: f32,
) -> TeacherTargets {
    let response = SampleLogitsResponse {
        sequences: vec![sampled_sequence(rows.clone(), Asked::samples(2), encoding)],
        seed: 7,
        model_id: "synthetic".into(),
        num_samples: 256,
        temperature,
        method: SamplingMethod::Sample as i32,
        value_encoding: encoding as i32,
    };
    let decoded = SampleLogitsResponse::decode(response.encode_to_vec().as_slice()).unwrap();
    TeacherTargets::from_sequence(
        &decoded.sequences[0],
        decoded.num_samples,
        decoded.value_encoding,
        decoded.method,
    )
    .unwrap()
}

#[test]
fn targets_decoded_by_the_client_are_what_the_server_sampled() {
    let rows = sampled(1.0);
    let t = through_the_wire(&rows, ValueEncoding::F32, 1.0);
    assert_eq!(t.first_position, 2);
    assert_eq!(t.offsets, rows.offsets);
    assert_eq!(t.token_ids, rows.token_ids);
    assert_eq!(t.counts, rows.counts);
    assert_eq!(t.logprobs, rows.logprobs);
    assert_eq!(t.lse, rows.lse);
}

#[test]
fn raw_teacher_logits_are_recovered_from_logprobs_and_lse() {
    let z = teacher_logits();
    for temperature in [1.0f32, 0.6] {
        let t = through_the_wire(&sampled(temperature), ValueEncoding::F32, temperature);
        let recovered = t.logits(temperature);
        for p in 0..POSITIONS {
            for e in t.range(p) {
                let want = z[p * VOCAB + t.token_ids[e] as usize];
                assert!(
                    (recovered[e] - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{} vs {want}",
                    recovered[e]
                );
            }
        }
    }
}

#[test]
fn loss_from_f16_targets_is_close_to_loss_from_f32_targets() {
    let rows = sampled(1.0);
    let student = Tensor::from_vec(
        (0..VOCAB * POSITIONS).map(|i| ((i * 40_503) % 997) as f32 / 300.0).collect::<Vec<f32>>(),
        (POSITIONS, VOCAB),
        &Device::Cpu,
    )
    .unwrap();
    let loss = |enc| {
        let t = through_the_wire(&rows, enc, 1.0);
        distill_loss(&student, &t, LossOptions::default(), None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (full, half) = (loss(ValueEncoding::F32), loss(ValueEncoding::F16));
    assert!(full.is_finite() && full > 0.0);
    assert!((full - half).abs() < 1e-3 * full, "{full} vs {half}");
}
