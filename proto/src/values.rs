//! Log-probability values on the wire: packed f32 (`logprobs`) or little-endian
//! f16/bf16 bytes (`packed_logprobs`), chosen by [`ValueEncoding`].

use half::{bf16, f16};

use crate::v1::{SampledSequence, ValueEncoding};

/// Values of one sequence, ready to be stored in a [`SampledSequence`].
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// Goes into `SampledSequence.logprobs`.
    F32(Vec<f32>),
    /// Goes into `SampledSequence.packed_logprobs`.
    Packed(Vec<u8>),
}

impl Values {
    /// Stores the values in the matching field of `seq`.
    pub fn store(self, seq: &mut SampledSequence) {
        match self {
            Values::F32(v) => seq.logprobs = v,
            Values::Packed(b) => seq.packed_logprobs = b,
        }
    }
}

/// Encodes `values` as `encoding` asks (unspecified means f32). Values are
/// rounded to nearest; -inf stays -inf in every encoding.
pub fn encode_values(values: &[f32], encoding: ValueEncoding) -> Values {
    match encoding {
        ValueEncoding::Unspecified | ValueEncoding::F32 => Values::F32(values.to_vec()),
        ValueEncoding::F16 => {
            Values::Packed(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect())
        }
        ValueEncoding::Bf16 => {
            Values::Packed(values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect())
        }
    }
}

/// Why the values of a [`SampledSequence`] could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The number of values does not match the number of token ids.
    #[error("sequence carries {values} log-probabilities for {ids} token ids")]
    LengthMismatch {
        /// Values found.
        values: usize,
        /// Token ids found.
        ids: usize,
    },
    /// Packed bytes are not a whole number of 2-byte values.
    #[error("packed_logprobs has {0} bytes, not a multiple of 2")]
    OddPackedLength(usize),
    /// The response names an encoding this library does not know.
    #[error("unknown value encoding {0}")]
    UnknownEncoding(i32),
}

/// Decodes the log-probabilities of `seq`, sent with `encoding`, into f32.
pub fn decode_values(seq: &SampledSequence, encoding: i32) -> Result<Vec<f32>, DecodeError> {
    let encoding =
        ValueEncoding::try_from(encoding).map_err(|_| DecodeError::UnknownEncoding(encoding))?;
    let values: Vec<f32> = match encoding {
        ValueEncoding::Unspecified | ValueEncoding::F32 => seq.logprobs.clone(),
        ValueEncoding::F16 | ValueEncoding::Bf16 => {
            let bytes = &seq.packed_logprobs;
            if !bytes.len().is_multiple_of(2) {
                return Err(DecodeError::OddPackedLength(bytes.len()));
            }
            let pairs = bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
            if encoding == ValueEncoding::F16 {
                pairs.map(|b| f16::from_le_bytes(b).to_f32()).collect()
            } else {
                pairs.map(|b| bf16::from_le_bytes(b).to_f32()).collect()
            }
        }
    };
    if values.len() != seq.token_ids.len() {
        return Err(DecodeError::LengthMismatch { values: values.len(), ids: seq.token_ids.len() });
    }
    Ok(values)
}
