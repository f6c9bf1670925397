//! Teacher-target sampling: the contract of docs/concepts/sampling.md, with the CPU reference
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

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod gpu_layout;
pub mod philox;

pub use cpu::CpuSampler;

/// How the ids of a row are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// k i.i.d. draws with replacement from softmax(z / T).
    Sample,
    /// The k largest logits (ties broken by the lower id), count 1 each,
    /// listed by descending log-probability (ties by ascending id).
    TopK,
    /// No ids: only the row's lse and what [`RowQueries`] ask for.
    None,
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
    /// Per row, when the rows' realised tokens were asked for: log p of the
    /// realised token (NaN for a row without one); empty otherwise.
    pub token_logprobs: Vec<f32>,
    /// Aligned with `token_logprobs`: 1 + the ids with a larger logit (0 for a
    /// row without a realised token).
    pub token_ranks: Vec<u32>,
    /// rows + 1 entries, starting at 0: row r's candidates are
    /// `candidate_logprobs[candidate_offsets[r]..candidate_offsets[r + 1]]`.
    pub candidate_offsets: Vec<u32>,
    /// log p at each candidate id, in the order asked.
    pub candidate_logprobs: Vec<f32>,
}

/// Marks a row without a realised token in [`RowQueries::realised`].
pub const NO_TOKEN: u32 = u32::MAX;

/// What a batch of rows asks for besides the draws: the realised next token of
/// each row and candidate ids, whose log-probabilities (and the realised
/// token's rank) the sampler computes in its pass over the row.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowQueries<'a> {
    /// Empty (not asked), or one per row: the realised token, or [`NO_TOKEN`].
    pub realised: &'a [u32],
    /// Empty (no candidates), or rows + 1 offsets into `candidate_ids` (they
    /// need not start at 0: a sub-range of rows keeps its parent's ids).
    pub candidate_offsets: &'a [u32],
    /// The candidate ids.
    pub candidate_ids: &'a [u32],
}

impl<'a> RowQueries<'a> {
    /// Nothing asked.
    pub const NONE: RowQueries<'static> =
        RowQueries { realised: &[], candidate_offsets: &[], candidate_ids: &[] };

    /// Whether anything is asked.
    pub fn is_empty(&self) -> bool {
        self.realised.is_empty() && self.candidate_offsets.is_empty()
    }

    /// The queries of rows `rows`.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> RowQueries<'a> {
        RowQueries {
            realised: if self.realised.is_empty() { &[] } else { &self.realised[rows.clone()] },
            candidate_offsets: if self.candidate_offsets.is_empty() {
                &[]
            } else {
                &self.candidate_offsets[rows.start..=rows.end]
            },
            candidate_ids: self.candidate_ids,
        }
    }

    /// Row `r`'s realised token (None when not asked; `Some(NO_TOKEN)` for a
    /// row without one) and candidate ids.
    pub fn row(&self, r: usize) -> (Option<u32>, &'a [u32]) {
        let realised = self.realised.get(r).copied();
        let candidates = if self.candidate_offsets.is_empty() {
            &[][..]
        } else {
            let e = logitd_proto::csr::entries(self.candidate_offsets, r..r + 1);
            &self.candidate_ids[e]
        };
        (realised, candidates)
    }

    /// Checks the shape against `rows` rows and every id against `vocab`.
    pub fn check(&self, rows: usize, vocab: usize) -> Result<(), SamplerError> {
        let bad_len = (!self.realised.is_empty() && self.realised.len() != rows)
            || (!self.candidate_offsets.is_empty()
                && (self.candidate_offsets.len() != rows + 1
                    || self.candidate_offsets.windows(2).any(|w| w[0] > w[1])
                    || *self.candidate_offsets.last().unwrap() as usize
                        > self.candidate_ids.len()));
        if bad_len {
            return Err(SamplerError::QueryShape { rows });
        }
        let ids = if self.candidate_offsets.is_empty() {
            &[][..]
        } else {
            &self.candidate_ids[logitd_proto::csr::entries(self.candidate_offsets, 0..rows)]
        };
        let outside =
            self.realised.iter().chain(ids).find(|&&id| id != NO_TOKEN && id as usize >= vocab);
        match outside {
            Some(&id) => Err(SamplerError::IdOutsideVocabulary { id, vocab }),
            None => Ok(()),
        }
    }
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
            token_logprobs: Vec::new(),
            token_ranks: Vec::new(),
            candidate_offsets: vec![0],
            candidate_logprobs: Vec::new(),
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

    /// Closes the row being built (its entries and its candidates).
    pub(crate) fn finish_row(&mut self, lse: f32) {
        self.lse.push(lse);
        let end = u32::try_from(self.token_ids.len())
            .expect("more than 2^32 sampled entries in one batch: this is a bug");
        self.offsets.push(end);
        let end = u32::try_from(self.candidate_logprobs.len())
            .expect("more than 2^32 candidates in one batch: this is a bug");
        self.candidate_offsets.push(end);
    }

    /// Drops the entries (ids, counts, log p) of rows `rows..`, keeping their
    /// lse and scores (the GPU's way to method None).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn drop_entries(&mut self, rows: std::ops::RangeFrom<usize>) {
        let start = self.offsets[rows.start];
        self.offsets[rows.start..].iter_mut().for_each(|o| *o = start);
        self.token_ids.truncate(start as usize);
        self.counts.truncate(start as usize);
        self.logprobs.truncate(start as usize);
    }

    /// A copy of rows `rows` (offsets rebased to 0).
    pub fn slice(&self, rows: std::ops::Range<usize>) -> SampledRows {
        let entries = logitd_proto::csr::entries(&self.offsets, rows.clone());
        let candidates = logitd_proto::csr::entries(&self.candidate_offsets, rows.clone());
        let per_row = |v: &[f32]| if v.is_empty() { Vec::new() } else { v[rows.clone()].to_vec() };
        SampledRows {
            offsets: logitd_proto::csr::rebased(&self.offsets, rows.clone()),
            token_ids: self.token_ids[entries.clone()].to_vec(),
            counts: self.counts[entries.clone()].to_vec(),
            logprobs: self.logprobs[entries].to_vec(),
            lse: self.lse[rows.clone()].to_vec(),
            token_logprobs: per_row(&self.token_logprobs),
            token_ranks: if self.token_ranks.is_empty() {
                Vec::new()
            } else {
                self.token_ranks[rows.clone()].to_vec()
            },
            candidate_offsets: logitd_proto::csr::rebased(&self.candidate_offsets, rows),
            candidate_logprobs: self.candidate_logprobs[candidates].to_vec(),
        }
    }

    /// Appends the rows of `part`.
    pub fn append(&mut self, part: &SampledRows) {
        logitd_proto::csr::append(&mut self.offsets, &part.offsets);
        self.token_ids.extend_from_slice(&part.token_ids);
        self.counts.extend_from_slice(&part.counts);
        self.logprobs.extend_from_slice(&part.logprobs);
        self.lse.extend_from_slice(&part.lse);
        self.token_logprobs.extend_from_slice(&part.token_logprobs);
        self.token_ranks.extend_from_slice(&part.token_ranks);
        logitd_proto::csr::append(&mut self.candidate_offsets, &part.candidate_offsets);
        self.candidate_logprobs.extend_from_slice(&part.candidate_logprobs);
    }

    /// Lists the entries of rows `rows..` by descending log-probability, ties
    /// by ascending id (the top-k order of the protocol).
    pub fn order_by_logprob(&mut self, rows: std::ops::RangeFrom<usize>) {
        for r in rows.start..self.num_rows() {
            self.order_entries_by_logprob(logitd_proto::csr::entries(&self.offsets, r..r + 1));
        }
    }

    /// Sorts `entries` by descending log-probability, ties by ascending id.
    pub(crate) fn order_entries_by_logprob(&mut self, entries: std::ops::Range<usize>) {
        let mut order: Vec<(f32, u32, u32)> = entries
            .clone()
            .map(|i| (self.logprobs[i], self.token_ids[i], self.counts[i]))
            .collect();
        order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (i, (lp, id, c)) in entries.zip(order) {
            (self.logprobs[i], self.token_ids[i], self.counts[i]) = (lp, id, c);
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
    /// The rows' queries do not match the rows (a bug in the caller).
    #[error("the realised tokens or candidate offsets do not match {rows} rows")]
    QueryShape {
        /// Rows sampled.
        rows: usize,
    },
    /// A realised token or candidate id is not in the vocabulary.
    #[error("id {id} is outside the vocabulary of {vocab}")]
    IdOutsideVocabulary {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
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
