//! Teacher-target sampling: the contract of docs/design.md §1, with the CPU reference
//! implementation.
//!
//! For one row of logits z ∈ R^V and temperature T, p = softmax(z / T). In
//! [`Method::Sample`] mode, k ids are drawn i.i.d. with replacement from p; in
//! [`Method::TopK`] mode the k largest logits are taken, count 1 each. Either way
//! a row yields its distinct ids in ascending order, the count of each, log p_i
//! over the whole vocabulary, and the row's log-sum-exp of z / T.
//!
//! Randomness is counter-based ([`philox`]): the draws of a row depend only on
//! its [`RowKey`], so a row gives the same samples whatever else shares its
//! batch, on the CPU or on the GPU.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod gpu_layout;
pub mod philox;

pub use backend::{LmHead, SamplerBackend};
pub use cpu::CpuSampler;

/// How the ids of a row are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// k i.i.d. draws with replacement from softmax(z / T).
    Sample,
    /// The k largest logits (ties broken by the lower id), count 1 each.
    TopK,
}

/// What to draw for every row of a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    method: Method,
    num_samples: u32,
    temperature: f32,
}

impl SamplingParams {
    /// Checks and builds the parameters: `num_samples` ≥ 1 and a finite
    /// temperature > 0.
    pub fn new(method: Method, num_samples: u32, temperature: f32) -> Result<Self, SamplerError> {
        if num_samples == 0 {
            return Err(SamplerError::InvalidNumSamples(num_samples));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(SamplerError::InvalidTemperature(temperature));
        }
        Ok(Self { method, num_samples, temperature })
    }

    /// The sampling method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// k, the draws per row (or the number of top logits).
    pub fn num_samples(&self) -> u32 {
        self.num_samples
    }

    /// The softmax temperature T.
    pub fn temperature(&self) -> f32 {
        self.temperature
    }
}

/// Identifies the random stream of one row: Philox keyed by `seed`, counted by
/// (`sequence`, `position`, draw index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowKey {
    /// The generator key.
    pub seed: u64,
    /// The sequence's index in its request (0 when the sequence has its own seed).
    pub sequence: u32,
    /// The position within the sequence.
    pub position: u32,
}

impl RowKey {
    /// The key of `position` in the request's sequence number `index`: a
    /// sequence with its own seed is keyed by that seed alone, so its samples do
    /// not depend on where it stands in the request; otherwise the request seed
    /// and the sequence's index.
    pub fn for_sequence(
        request_seed: u64,
        index: u32,
        sequence_seed: Option<u64>,
        position: u32,
    ) -> Self {
        match sequence_seed {
            Some(seed) => Self { seed, sequence: 0, position },
            None => Self { seed: request_seed, sequence: index, position },
        }
    }

    /// The Philox counter of the `block`-th group of four draws.
    #[inline]
    pub fn counter(&self, block: u32) -> [u32; 4] {
        [block, self.position, self.sequence, 0]
    }

    /// The Philox key.
    #[inline]
    pub fn philox_key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }
}

/// Sampled rows in CSR form: row r owns entries `offsets[r]..offsets[r + 1]` of
/// `token_ids`, `counts` and `logprobs`, and `lse[r]` (the offset arithmetic is
/// [`logitd_proto::csr`], shared with the client's `TeacherTargets`).
#[derive(Debug, Clone, PartialEq)]
pub struct SampledRows {
    /// rows + 1 entries, starting at 0.
    pub offsets: Vec<u32>,
    /// Distinct ids, ascending within a row.
    pub token_ids: Vec<u32>,
    /// Draws that hit each id (sum k per row in sample mode; 1 each in top-k).
    pub counts: Vec<u32>,
    /// log p_i over the whole vocabulary at temperature T.
    pub logprobs: Vec<f32>,
    /// Per row: log-sum-exp of z / T.
    pub lse: Vec<f32>,
}

impl Default for SampledRows {
    fn default() -> Self {
        Self::new()
    }
}

/// One row of [`SampledRows`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledRow<'a> {
    /// Distinct ids, ascending.
    pub token_ids: &'a [u32],
    /// Count of each id.
    pub counts: &'a [u32],
    /// log p of each id.
    pub logprobs: &'a [f32],
    /// log-sum-exp of z / T.
    pub lse: f32,
}

impl SampledRows {
    /// No rows.
    pub fn new() -> Self {
        Self {
            offsets: vec![0],
            token_ids: Vec::new(),
            counts: Vec::new(),
            logprobs: Vec::new(),
            lse: Vec::new(),
        }
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.lse.len()
    }

    /// Number of (id, count, logprob) entries over all rows.
    pub fn num_entries(&self) -> usize {
        self.token_ids.len()
    }

    /// Row `r`. Panics if `r >= num_rows()`.
    pub fn row(&self, r: usize) -> SampledRow<'_> {
        let e = logitd_proto::csr::entries(&self.offsets, r..r + 1);
        SampledRow {
            token_ids: &self.token_ids[e.clone()],
            counts: &self.counts[e.clone()],
            logprobs: &self.logprobs[e],
            lse: self.lse[r],
        }
    }

    /// Appends one entry to the row being built.
    #[inline]
    pub(crate) fn push_entry(&mut self, id: u32, count: u32, logprob: f32) {
        self.token_ids.push(id);
        self.counts.push(count);
        self.logprobs.push(logprob);
    }

    /// Closes the row being built.
    pub(crate) fn finish_row(&mut self, lse: f32) {
        self.lse.push(lse);
        let end = u32::try_from(self.token_ids.len())
            .expect("more than 2^32 sampled entries in one batch: this is a bug");
        self.offsets.push(end);
    }

    /// A copy of rows `rows` (offsets rebased to 0).
    pub fn slice(&self, rows: std::ops::Range<usize>) -> SampledRows {
        let entries = logitd_proto::csr::entries(&self.offsets, rows.clone());
        SampledRows {
            offsets: logitd_proto::csr::rebased(&self.offsets, rows.clone()),
            token_ids: self.token_ids[entries.clone()].to_vec(),
            counts: self.counts[entries.clone()].to_vec(),
            logprobs: self.logprobs[entries].to_vec(),
            lse: self.lse[rows].to_vec(),
        }
    }
}

/// Why a row could not be sampled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// k must be at least 1.
    #[error("num_samples must be at least 1, got {0}")]
    InvalidNumSamples(u32),
    /// T must be finite and positive.
    #[error("temperature must be finite and > 0, got {0}")]
    InvalidTemperature(f32),
    /// A row's logits contain NaN or +inf (a model fault, never client input).
    #[error("logit {index} of the row is {value}: the teacher produced a non-finite logit")]
    NonFiniteLogit {
        /// Index in the vocabulary.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// Every logit of the row is -inf, so p is undefined.
    #[error("every logit of the row is -inf: nothing can be sampled")]
    AllMasked,
    /// The row is empty (vocabulary size 0).
    #[error("the row has no logits")]
    EmptyRow,
    /// The flat logits buffer does not hold a whole number of rows.
    #[error("{len} logits do not make {rows} rows of {vocab}")]
    ShapeMismatch {
        /// Length of the buffer.
        len: usize,
        /// Rows expected.
        rows: usize,
        /// Vocabulary size.
        vocab: usize,
    },
}
