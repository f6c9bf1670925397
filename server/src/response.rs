//! Sampled rows → the wire's columnar [`SampledSequence`].

use logitd_proto::{
    encode_values,
    v1::{SampledSequence, ValueEncoding},
};

use crate::sampler::SampledRows;

/// Builds the [`SampledSequence`] of one sequence from its sampled rows (one
/// per returned position, the first being `first_position`); log-probabilities
/// are encoded as `encoding` asks. The columns are moved, not copied.
pub fn sampled_sequence(
    rows: SampledRows,
    first_position: u32,
    encoding: ValueEncoding,
) -> SampledSequence {
    let mut seq = SampledSequence {
        first_position,
        offsets: rows.offsets,
        token_ids: rows.token_ids,
        counts: rows.counts,
        logprobs: Vec::new(),
        packed_logprobs: Vec::new(),
        lse: rows.lse,
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
        }
    }

    fn round_trip(encoding: ValueEncoding) -> (SampledSequence, Vec<f32>) {
        let seq = sampled_sequence(rows().slice(1..3), 7, encoding);
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
}
