//! The decoded sparse teacher target of one sequence.

use logitd_proto::{DecodeError, decode_values, v1::SampledSequence};

/// Teacher targets of one sequence in CSR form: returned position `p` owns
/// entries `offsets[p]..offsets[p + 1]` of `token_ids`, `counts` and `logprobs`.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherTargets {
    /// k: draws per position (counts of a position sum to it in sample mode).
    pub num_samples: u32,
    /// The sequence position of the first returned position.
    pub first_position: u32,
    /// positions + 1 entries, starting at 0.
    pub offsets: Vec<u32>,
    /// Distinct sampled ids, ascending within a position.
    pub token_ids: Vec<u32>,
    /// Draws that hit each id.
    pub counts: Vec<u32>,
    /// Teacher log p of each id, normalised over the whole vocabulary.
    pub logprobs: Vec<f32>,
    /// Per position: log-sum-exp of the teacher's z / T.
    pub lse: Vec<f32>,
}

/// Why a reply could not be turned into [`TeacherTargets`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TargetsError {
    /// The log-probability values could not be decoded.
    #[error(transparent)]
    Values(#[from] DecodeError),
    /// The CSR columns do not fit together.
    #[error("malformed teacher targets: {0}")]
    Malformed(String),
}

impl TeacherTargets {
    /// Decodes one [`SampledSequence`] of a response whose `num_samples` and
    /// `value_encoding` are given, checking that its columns fit together.
    pub fn from_sequence(
        seq: &SampledSequence,
        num_samples: u32,
        value_encoding: i32,
    ) -> Result<Self, TargetsError> {
        let targets = Self {
            num_samples,
            first_position: seq.first_position,
            offsets: seq.offsets.clone(),
            token_ids: seq.token_ids.clone(),
            counts: seq.counts.clone(),
            logprobs: decode_values(seq, value_encoding)?,
            lse: seq.lse.clone(),
        };
        targets.validate()?;
        Ok(targets)
    }

    /// Checks the CSR invariants: offsets start at 0, never decrease and end at
    /// the number of entries; every position has at least one id; the columns
    /// have matching lengths.
    pub fn validate(&self) -> Result<(), TargetsError> {
        let bad = |m: String| Err(TargetsError::Malformed(m));
        let n = self.token_ids.len();
        if self.offsets.first() != Some(&0) {
            return bad("offsets must start with 0".into());
        }
        if *self.offsets.last().expect("non-empty") as usize != n {
            return bad(format!(
                "offsets end at {} but there are {n} ids",
                self.offsets.last().unwrap()
            ));
        }
        if let Some(p) = self.offsets.windows(2).position(|w| w[1] <= w[0]) {
            return bad(format!("position {p} has no sampled ids (offsets must increase)"));
        }
        if self.counts.len() != n || self.logprobs.len() != n {
            return bad(format!(
                "{n} ids but {} counts and {} logprobs",
                self.counts.len(),
                self.logprobs.len()
            ));
        }
        if self.lse.len() != self.num_positions() {
            return bad(format!(
                "{} lse values for {} positions",
                self.lse.len(),
                self.num_positions()
            ));
        }
        Ok(())
    }

    /// Number of returned positions.
    pub fn num_positions(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Entry range of position `p`.
    pub fn range(&self, p: usize) -> std::ops::Range<usize> {
        self.offsets[p] as usize..self.offsets[p + 1] as usize
    }

    /// Per position, the teacher probability mass of the sampled ids, Σ_{i∈S} p_i.
    pub fn mass_covered(&self) -> Vec<f32> {
        (0..self.num_positions())
            .map(|p| {
                self.logprobs[self.range(p)].iter().map(|&l| f64::from(l).exp()).sum::<f64>() as f32
            })
            .collect()
    }

    /// The raw teacher logit of every entry: z_i = T · (logprob_i + lse).
    pub fn logits(&self, temperature: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.token_ids.len());
        for p in 0..self.num_positions() {
            let lse = f64::from(self.lse[p]);
            out.extend(
                self.logprobs[self.range(p)]
                    .iter()
                    .map(|&l| (f64::from(temperature) * (f64::from(l) + lse)) as f32),
            );
        }
        out
    }
}
