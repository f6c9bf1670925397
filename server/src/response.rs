//! Sampled rows → the wire's columnar [`SampledSequence`].

use logitd_proto::{
    encode_values,
    v1::{SampledSequence, ValueEncoding},
};

use crate::sampler::{Method, SampledRows};

/// What a sequence asked for, which decides the columns of its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// Its first returned position.
    pub first_position: u32,
    /// The request's method (top-k replies leave `counts` off the wire).
    pub method: Method,
    /// Whether the request asked for the realised tokens' log-probabilities.
    pub token_logprobs: bool,
    /// Whether the sequence named candidate ids.
    pub candidates: bool,
}

impl Asked {
    /// Sample mode from `first_position`, nothing else asked.
    pub fn samples(first_position: u32) -> Self {
        Self { first_position, method: Method::Sample, token_logprobs: false, candidates: false }
    }
}

/// Builds the [`SampledSequence`] of one sequence from its sampled rows (one
/// per returned position, the first being `asked.first_position`);
/// log-probabilities are encoded as `encoding` asks. The columns are moved,
/// not copied. The realised-token columns lose their last entry (the
/// sequence's last position, which has no next token).
pub fn sampled_sequence(
    rows: SampledRows,
    asked: Asked,
    encoding: ValueEncoding,
) -> SampledSequence {
    let mut token_logprobs = Vec::new();
    let mut token_ranks = Vec::new();
    if asked.token_logprobs {
        token_logprobs = rows.token_logprobs;
        token_ranks = rows.token_ranks;
        token_logprobs.pop();
        token_ranks.pop();
    }
    let (candidate_offsets, candidate_logprobs) = if asked.candidates {
        (rows.candidate_offsets, rows.candidate_logprobs)
    } else {
        (Vec::new(), Vec::new())
    };
    let counts = if asked.method == Method::TopK { Vec::new() } else { rows.counts };
    let mut seq = SampledSequence {
        first_position: asked.first_position,
        offsets: rows.offsets,
        token_ids: rows.token_ids,
        counts,
        logprobs: Vec::new(),
        packed_logprobs: Vec::new(),
        lse: rows.lse,
        token_logprobs,
        token_ranks,
        candidate_offsets,
        candidate_logprobs,
    };
    match encoding {
        ValueEncoding::Unspecified | ValueEncoding::F32 => seq.logprobs = rows.logprobs,
        packed => encode_values(&rows.logprobs, packed).store(&mut seq),
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;
    use logitd_proto::{
        decode_values,
        v1::{SampleLogitsResponse, SamplingMethod},
    };
    use prost::Message;

    /// Two rows of hand-written entries (values chosen so f16 must round some).
    fn rows() -> SampledRows {
        SampledRows {
            offsets: vec![0, 2, 5, 6],
            token_ids: vec![3, 17, 0, 5, 49_151, 7],
            counts: vec![200, 56, 1, 254, 1, 256],
            logprobs: vec![-0.1053605, -2.3, -9.2103404, -0.0039, -13.815511, 0.0],
            lse: vec![4.25, -1.0e-3, 12.5],
            candidate_offsets: vec![0, 0, 0, 0],
            ..SampledRows::new()
        }
    }

    fn round_trip(encoding: ValueEncoding) -> (SampledSequence, Vec<f32>) {
        let seq = sampled_sequence(rows().slice(1..3), Asked::samples(7), encoding);
        let response = SampleLogitsResponse {
            sequences: vec![seq],
            seed: 42,
            model_id: "test".into(),
            num_samples: 256,
            temperature: 1.0,
            method: SamplingMethod::Sample as i32,
            value_encoding: encoding as i32,
        };
        let bytes = response.encode_to_vec();
        let decoded = SampleLogitsResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, response);
        let seq = decoded.sequences.into_iter().next().unwrap();
        let values = decode_values(&seq, decoded.value_encoding).expect("values decode");
        (seq, values)
    }

    fn check_columns(seq: &SampledSequence) {
        assert_eq!(seq.first_position, 7);
        assert_eq!(seq.offsets, vec![0, 3, 4]);
        assert_eq!(seq.token_ids, vec![0, 5, 49_151, 7]);
        assert_eq!(seq.counts, vec![1, 254, 1, 256]);
        assert_eq!(seq.lse, vec![-1.0e-3, 12.5]);
    }

    #[test]
    fn f32_values_survive_the_wire_exactly() {
        let (seq, values) = round_trip(ValueEncoding::F32);
        check_columns(&seq);
        assert!(seq.packed_logprobs.is_empty());
        assert_eq!(values, vec![-9.2103404, -0.0039, -13.815511, 0.0]);
    }

    #[test]
    fn f16_values_survive_the_wire_within_half_precision() {
        let (seq, values) = round_trip(ValueEncoding::F16);
        check_columns(&seq);
        assert!(seq.logprobs.is_empty());
        assert_eq!(seq.packed_logprobs.len(), 8, "two bytes per value");
        let want = [-9.2103404f64, -0.0039, -13.815511, 0.0];
        for (got, want) in values.iter().zip(want) {
            // binary16 keeps 11 significant bits: relative error at most 2^-11
            // (values here are far from the subnormal range).
            let tol = want.abs() * 2f64.powi(-11);
            assert!((f64::from(*got) - want).abs() <= tol, "{got} vs {want}");
        }
        assert_ne!(values[0], -9.2103404f32, "f16 must actually round this value");
    }

    #[test]
    fn bf16_values_survive_the_wire_within_bfloat_precision() {
        let (_, values) = round_trip(ValueEncoding::Bf16);
        let want = [-9.2103404f64, -0.0039, -13.815511, 0.0];
        for (got, want) in values.iter().zip(want) {
            let tol = want.abs() * 2f64.powi(-8);
            assert!((f64::from(*got) - want).abs() <= tol, "{got} vs {want}");
        }
    }

    proptest::proptest! {
        /// Any rows (random entry counts, ids, counts, log-probabilities incl.
        /// tiny, huge and zero values), sliced anywhere, survive the wire: the
        /// columns exactly, f32 values bit for bit, f16/bf16 within their
        /// rounding (or the f16 range limit for values below its smallest).
        #[test]
        fn any_rows_round_trip_through_the_wire(
            rows in proptest::collection::vec(
                proptest::collection::vec(
                    (0u32..262_144, 1u32..=4096, -120.0f32..=0.0), 1..20),
                1..12),
            lse in proptest::collection::vec(-1.0e4f32..1.0e4, 12),
            cut in 0usize..12,
            first in 0u32..100_000,
            enc in 0usize..3,
        ) {
            let mut all = SampledRows::new();
            for (r, entries) in rows.iter().enumerate() {
                for &(id, count, lp) in entries {
                    all.push_entry(id, count, lp);
                }
                all.finish_row(lse[r]);
            }
            let from = cut.min(rows.len() - 1);
            let part = all.slice(from..rows.len());
            let encoding = [ValueEncoding::F32, ValueEncoding::F16, ValueEncoding::Bf16][enc];
            let seq = sampled_sequence(part, Asked::samples(first), encoding);
            let response = SampleLogitsResponse {
                sequences: vec![seq],
                value_encoding: encoding as i32,
                ..Default::default()
            };
            let decoded = SampleLogitsResponse::decode(response.encode_to_vec().as_slice()).unwrap();
            proptest::prop_assert_eq!(&decoded, &response);
            let seq = &decoded.sequences[0];
            let values = decode_values(seq, decoded.value_encoding).unwrap();
            let want: Vec<(u32, u32, f32)> = rows[from..].iter().flatten().copied().collect();
            proptest::prop_assert_eq!(seq.first_position, first);
            proptest::prop_assert_eq!(seq.offsets.len(), rows.len() - from + 1);
            proptest::prop_assert_eq!(&seq.lse[..], &lse[from..rows.len()]);
            for (r, entries) in rows[from..].iter().enumerate() {
                let (a, b) = (seq.offsets[r] as usize, seq.offsets[r + 1] as usize);
                proptest::prop_assert_eq!(b - a, entries.len());
            }
            proptest::prop_assert_eq!(values.len(), want.len());
            for (i, &(id, count, lp)) in want.iter().enumerate() {
                proptest::prop_assert_eq!(seq.token_ids[i], id);
                proptest::prop_assert_eq!(seq.counts[i], count);
                let got = f64::from(values[i]);
                let lp = f64::from(lp);
                let ok = match encoding {
                    ValueEncoding::F16 => {
                        (got - lp).abs() <= lp.abs() * 2f64.powi(-11) + 2f64.powi(-24)
                    }
                    ValueEncoding::Bf16 => (got - lp).abs() <= lp.abs() * 2f64.powi(-8),
                    _ => got.to_bits() == lp.to_bits(),
                };
                proptest::prop_assert!(ok, "{:?}: {} became {}", encoding, lp, got);
            }
        }
    }
}
