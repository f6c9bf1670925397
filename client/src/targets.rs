//! The decoded sparse teacher target of one sequence.

use logitd_proto::{DecodeError, csr, decode_values, v1::SampledSequence};

/// Teacher targets of one sequence in CSR form: returned position `p` owns
/// entries `offsets[p]..offsets[p + 1]` of `token_ids`, `counts` and `logprobs`
/// (the offset arithmetic is [`logitd_proto::csr`], shared with the server's
/// sampled rows; the validation of a received message is the client's own).
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

    /// The targets of several sequences as one (positions in order, e.g. a
    /// training batch whose student logits are stacked the same way).
    pub fn concat(parts: &[TeacherTargets]) -> Result<Self, TargetsError> {
        let Some(first) = parts.first() else {
            return Err(TargetsError::Malformed("nothing to concatenate".into()));
        };
        let mut out = TeacherTargets::empty(first.num_samples, first.first_position);
        for p in parts {
            if p.num_samples != out.num_samples {
                return Err(TargetsError::Malformed(format!(
                    "cannot concatenate targets with k = {} and k = {}",
                    out.num_samples, p.num_samples
                )));
            }
            out.append(p);
        }
        Ok(out)
    }

    /// No positions yet.
    pub(crate) fn empty(num_samples: u32, first_position: u32) -> Self {
        TeacherTargets {
            num_samples,
            first_position,
            offsets: vec![0],
            token_ids: vec![],
            counts: vec![],
            logprobs: vec![],
            lse: vec![],
        }
    }

    /// Appends the positions of `other` after these (offsets rebased).
    pub(crate) fn append(&mut self, other: &TeacherTargets) {
        csr::append(&mut self.offsets, &other.offsets);
        self.token_ids.extend_from_slice(&other.token_ids);
        self.counts.extend_from_slice(&other.counts);
        self.logprobs.extend_from_slice(&other.logprobs);
        self.lse.extend_from_slice(&other.lse);
    }

    /// The first `n` positions only.
    pub fn truncated(&self, n: usize) -> Self {
        let n = n.min(self.num_positions());
        let end = self.offsets[n] as usize;
        TeacherTargets {
            num_samples: self.num_samples,
            first_position: self.first_position,
            offsets: self.offsets[..=n].to_vec(),
            token_ids: self.token_ids[..end].to_vec(),
            counts: self.counts[..end].to_vec(),
            logprobs: self.logprobs[..end].to_vec(),
            lse: self.lse[..n].to_vec(),
        }
    }

    /// Hard labels as targets: one id per position with weight 1, so that
    /// [`distill_loss`](crate::distill_loss) is plain cross-entropy.
    pub fn one_hot(ids: &[u32]) -> Self {
        TeacherTargets {
            num_samples: 1,
            first_position: 0,
            offsets: (0..=ids.len() as u32).collect(),
            token_ids: ids.to_vec(),
            counts: vec![1; ids.len()],
            logprobs: vec![0.0; ids.len()],
            lse: vec![0.0; ids.len()],
        }
    }

    /// Number of returned positions.
    pub fn num_positions(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Entry range of position `p`.
    pub fn range(&self, p: usize) -> std::ops::Range<usize> {
        csr::entries(&self.offsets, p..p + 1)
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
