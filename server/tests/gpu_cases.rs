//! The inputs and judgements of the GPU sampler tests (`gpu_common/`, used by
//! `gpu_sampler.rs` on a GPU), checked on the CPU in every build: each case's
//! rows are ones the CPU reference samples (or, for the deliberate all-masked
//! case, refuses).

mod gpu_common;

use candle_core::{DType, Device, Tensor};
use gpu_common::*;
use logitd::sampler::{CpuSampler, SampledRows, SamplerError};

/// The dtypes the GPU test samples in, as the values the CPU reference sees.
fn as_dtype(z: &[f32], vocab: usize, dtype: DType) -> Vec<f32> {
    let t = Tensor::from_slice(z, (z.len() / vocab, vocab), &Device::Cpu).unwrap();
    t.to_dtype(dtype)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn no_row_all_masked(z: &[f32], vocab: usize) -> Result<(), usize> {
    match z.chunks_exact(vocab).position(|row| row.iter().all(|v| *v == f32::NEG_INFINITY)) {
        Some(r) => Err(r),
        None => Ok(()),
    }
}

#[test]
fn every_generated_row_has_a_finite_logit() {
    for vocab in RAGGED_VOCABS {
        let z = ragged_logits(vocab);
        assert_eq!(no_row_all_masked(&z, vocab), Ok(()), "ragged case V={vocab}: row all -inf");
    }
    // bad_rows_fail_as_on_the_cpu's rows, and tiny vocabularies under many seeds
    // (at V = 1 a masked-kind row is all -inf one time in ten without the kept id).
    assert_eq!(no_row_all_masked(&random_logits(4, 5000, 3), 5000), Ok(()));
    for vocab in [1, 2, 3] {
        for seed in 0..50 {
            let z = random_logits(256, vocab, seed);
            assert_eq!(no_row_all_masked(&z, vocab), Ok(()), "V={vocab} seed={seed}");
        }
    }
    // The masking still masks: about 10% of a masked-kind row's ids.
    let vocab = 4099;
    let z = random_logits(8, vocab, 1);
    let masked = z[3 * vocab..4 * vocab].iter().filter(|v| v.is_infinite()).count();
    assert!((300..520).contains(&masked), "{masked} of {vocab} masked");
}

/// What `both()` of gpu_sampler.rs asks of the CPU reference in the ragged
/// case: every (V, dtype, params) samples. (Before every row kept a finite
/// logit, V = 1 failed here with AllMasked at row 35, and so did the GPU test.)
#[test]
fn the_reference_samples_every_ragged_case() {
    for vocab in RAGGED_VOCABS {
        let z = ragged_logits(vocab);
        for dtype in RAGGED_DTYPES {
            let seen = as_dtype(&z, vocab, dtype);
            for params in ragged_params() {
                let mut out = SampledRows::new();
                CpuSampler::new()
                    .sample_rows(&seen, vocab, &params, &keys(RAGGED_ROWS, 1), &mut out)
                    .unwrap_or_else(|e| panic!("V={vocab} {dtype:?} {params:?}: {e}"));
                assert_eq!(out.num_rows(), RAGGED_ROWS);
            }
        }
    }
}

/// The deliberate all-masked case: the reference refuses row ALL_MASKED_ROW
/// with AllMasked and keeps the rows before it (the GPU test expects the same
/// error and rows from the kernel).
#[test]
fn the_all_masked_case_fails_after_the_rows_before_it() {
    for vocab in [1, 2, 7, 257] {
        let z = all_masked_logits(vocab);
        assert_eq!(no_row_all_masked(&z, vocab), Err(ALL_MASKED_ROW));
        for dtype in RAGGED_DTYPES {
            let seen = as_dtype(&z, vocab, dtype);
            for params in ragged_params() {
                let mut out = SampledRows::new();
                let e = CpuSampler::new()
                    .sample_rows(&seen, vocab, &params, &keys(RAGGED_ROWS, 1), &mut out)
                    .unwrap_err();
                assert_eq!(e, SamplerError::AllMasked, "V={vocab} {dtype:?}");
                assert_eq!(out.num_rows(), ALL_MASKED_ROW, "V={vocab} {dtype:?}");
            }
        }
    }
}
