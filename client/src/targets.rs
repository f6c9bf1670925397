//! The decoded sparse teacher target of one sequence.

use logitd_proto::{
    DecodeError, csr, decode_values,
    v1::{SampledSequence, SamplingMethod},
};

/// Teacher targets of one sequence in CSR form: returned position `p` owns
/// entries `offsets[p]..offsets[p + 1]` of `token_ids`, `counts` and `logprobs`
/// (the offset arithmetic is [`logitd_proto::csr`], shared with the server's
/// sampled rows; the validation of a received message is the client's own).
///
/// When the request asked for them, `token_logprobs`/`token_ranks` hold one
/// value per position (the realised next token's log p and rank; NaN and 0 at
/// a position without a next token, the sequence's last), and
/// `candidate_offsets`/`candidate_logprobs` the candidates' log p per position
/// (CSR like the entries). Otherwise those columns are empty.
#[derive(Debug, Clone, PartialEq, Default)]
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
    /// Empty, or per position: log p of the realised next token (NaN where
    /// there is none).
    pub token_logprobs: Vec<f32>,
    /// Empty, or per position: the realised token's rank (1 = the teacher's
    /// most likely id; 0 where there is none).
    pub token_ranks: Vec<u32>,
    /// Empty, or positions + 1 entries from 0: position p's candidates are
    /// `candidate_logprobs[candidate_offsets[p]..candidate_offsets[p + 1]]`.
    pub candidate_offsets: Vec<u32>,
    /// log p at the candidate ids the request named, in its order.
    pub candidate_logprobs: Vec<f32>,
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
    /// Decodes one [`SampledSequence`] of a response whose `num_samples`,
    /// `value_encoding` and `method` are given, checking that its columns fit
    /// together. Top-k replies carry no counts (every count is 1): they are
    /// restored here. The realised-token columns get a last entry (NaN, rank
    /// 0) for the position that has no next token.
    pub fn from_sequence(
        seq: &SampledSequence,
        num_samples: u32,
        value_encoding: i32,
        method: i32,
    ) -> Result<Self, TargetsError> {
        let positions = seq.lse.len();
        let top_k = method == SamplingMethod::TopK as i32;
        let counts = if top_k && seq.counts.is_empty() {
            vec![1; seq.token_ids.len()]
        } else {
            seq.counts.clone()
        };
        let (mut token_logprobs, mut token_ranks) = (Vec::new(), Vec::new());
        if positions > 0 && seq.token_logprobs.len() + 1 == positions {
            token_logprobs = seq.token_logprobs.clone();
            token_logprobs.push(f32::NAN);
            token_ranks = seq.token_ranks.clone();
            token_ranks.push(0);
        } else if !seq.token_logprobs.is_empty() || !seq.token_ranks.is_empty() {
            return Err(TargetsError::Malformed(format!(
                "{} token_logprobs for {positions} positions (expected one fewer)",
                seq.token_logprobs.len()
            )));
        }
        let targets = Self {
            num_samples,
            first_position: seq.first_position,
            offsets: seq.offsets.clone(),
            token_ids: seq.token_ids.clone(),
            counts,
            logprobs: decode_values(seq, value_encoding)?,
            lse: seq.lse.clone(),
            token_logprobs,
            token_ranks,
            candidate_offsets: seq.candidate_offsets.clone(),
            candidate_logprobs: seq.candidate_logprobs.clone(),
        };
        targets.validate()?;
        Ok(targets)
    }

    /// Checks the CSR invariants: offsets start at 0, never decrease and end at
    /// the number of entries; every position has at least one id (unless
    /// `num_samples` is 0: scoring alone, no ids); the columns have matching
    /// lengths, the optional ones included.
    pub fn validate(&self) -> Result<(), TargetsError> {
        self.validate_entries()?;
        self.validate_scores()
    }

    fn validate_scores(&self) -> Result<(), TargetsError> {
        let bad = |m: String| Err(TargetsError::Malformed(m));
        let p = self.num_positions();
        if !self.token_logprobs.is_empty() && self.token_logprobs.len() != p {
            return bad(format!("{} token_logprobs for {p} positions", self.token_logprobs.len()));
        }
        if self.token_ranks.len() != self.token_logprobs.len() {
            return bad(format!(
                "{} token_ranks but {} token_logprobs",
                self.token_ranks.len(),
                self.token_logprobs.len()
            ));
        }
        if self.candidate_offsets.is_empty() {
            if !self.candidate_logprobs.is_empty() {
                return bad("candidate_logprobs without candidate_offsets".into());
            }
            return Ok(());
        }
        let o = &self.candidate_offsets;
        if o.len() != p + 1
            || o[0] != 0
            || o.windows(2).any(|w| w[1] < w[0])
            || *o.last().expect("not empty") as usize != self.candidate_logprobs.len()
        {
            return bad(format!(
                "candidate_offsets ({} entries, ending at {}) do not fit {p} positions and {} candidate_logprobs",
                o.len(),
                o.last().expect("not empty"),
                self.candidate_logprobs.len()
            ));
        }
        Ok(())
    }

    fn validate_entries(&self) -> Result<(), TargetsError> {
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
        let empty_ok = self.num_samples == 0;
        if let Some(p) =
            self.offsets.windows(2).position(|w| w[1] < w[0] || (w[1] == w[0] && !empty_ok))
        {
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
        TeacherTargets { num_samples, first_position, offsets: vec![0], ..Self::default() }
    }

    /// Appends the positions of `other` after these (offsets rebased). The
    /// optional columns must be there in both or in neither (checked by
    /// [`validate`](Self::validate) on the result).
    pub(crate) fn append(&mut self, other: &TeacherTargets) {
        let positions = self.num_positions();
        csr::append(&mut self.offsets, &other.offsets);
        self.token_ids.extend_from_slice(&other.token_ids);
        self.counts.extend_from_slice(&other.counts);
        self.logprobs.extend_from_slice(&other.logprobs);
        self.lse.extend_from_slice(&other.lse);
        self.token_logprobs.extend_from_slice(&other.token_logprobs);
        self.token_ranks.extend_from_slice(&other.token_ranks);
        if !other.candidate_offsets.is_empty() {
            if self.candidate_offsets.is_empty() && positions == 0 {
                self.candidate_offsets.push(0);
            }
            csr::append(&mut self.candidate_offsets, &other.candidate_offsets);
        }
        self.candidate_logprobs.extend_from_slice(&other.candidate_logprobs);
    }

    /// The first `n` positions only.
    pub fn truncated(&self, n: usize) -> Self {
        let n = n.min(self.num_positions());
        let end = self.offsets[n] as usize;
        let per = |v: &[f32]| if v.is_empty() { vec![] } else { v[..n].to_vec() };
        let (candidate_offsets, candidate_logprobs) = if self.candidate_offsets.is_empty() {
            (vec![], vec![])
        } else {
            let c = self.candidate_offsets[n] as usize;
            (self.candidate_offsets[..=n].to_vec(), self.candidate_logprobs[..c].to_vec())
        };
        TeacherTargets {
            num_samples: self.num_samples,
            first_position: self.first_position,
            offsets: self.offsets[..=n].to_vec(),
            token_ids: self.token_ids[..end].to_vec(),
            counts: self.counts[..end].to_vec(),
            logprobs: self.logprobs[..end].to_vec(),
            lse: self.lse[..n].to_vec(),
            token_logprobs: per(&self.token_logprobs),
            token_ranks: if self.token_ranks.is_empty() {
                vec![]
            } else {
                self.token_ranks[..n].to_vec()
            },
            candidate_offsets,
            candidate_logprobs,
        }
    }

    /// Position p's candidate log-probabilities (empty when none were asked).
    pub fn candidates(&self, p: usize) -> &[f32] {
        if self.candidate_offsets.is_empty() {
            return &[];
        }
        &self.candidate_logprobs[csr::entries(&self.candidate_offsets, p..p + 1)]
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
            ..Self::default()
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
