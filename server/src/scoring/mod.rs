//! The scoring seam, above both the model and the sampler: what the engine
//! runs a batch on ([`ScoringBackend`]), the real backend ([`TeacherBackend`]:
//! the teacher and the [`SamplerBackend`] of its device), the LM head the
//! sampler backend sees ([`LmHead`]), and the errors of both ([`ScoringError`],
//! [`EngineError`]). `model` and `sampler` know nothing of each other; this
//! module joins them: kernels ← {model, sampler} ← scoring ← queue, engine.

mod head;

use candle_core::Tensor;

pub use head::{DEFAULT_GPU_HEAD_CHUNK_LOGITS, DEFAULT_HEAD_CHUNK_LOGITS, SamplerBackend};

use crate::{
    device,
    model::{ModelError, PackedBatch, Teacher},
    sampler::{RowKey, RowQueries, SampledRows, SamplerError, SamplingParams},
};

/// What the sampler backend needs from the model.
pub trait LmHead {
    /// V, the logits per row.
    fn vocab_size(&self) -> usize;

    /// The LM head's logits [rows, V] of `hidden_rows`, in the compute dtype,
    /// or in f32 when a final soft-cap applies; widened to f32 they are the
    /// model's logits exactly.
    fn head_logits(&self, hidden_rows: &Tensor) -> Result<Tensor, ModelError>;
}

impl LmHead for Teacher {
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn head_logits(&self, hidden_rows: &Tensor) -> Result<Tensor, ModelError> {
        Teacher::head_logits(self, hidden_rows)
    }
}

/// Why a batch failed. Every item of the batch gets the same error; the next
/// batch is served as usual.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A test asked for this batch to fail (`--inject-engine-fault`).
    #[error("injected device fault on batch {0}")]
    InjectedFault(u64),
    /// The model, the LM head or the sampler failed.
    #[error(transparent)]
    Scoring(#[from] ScoringError),
}

impl EngineError {
    /// A short label of the failing part, for metrics and logs: `injected_fault`,
    /// or [`ScoringError::kind`].
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InjectedFault(_) => "injected_fault",
            EngineError::Scoring(e) => e.kind(),
        }
    }
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        EngineError::Scoring(e.into())
    }
}

impl From<SamplerError> for EngineError {
    fn from(e: SamplerError) -> Self {
        EngineError::Scoring(e.into())
    }
}

/// Why scoring a batch failed: the model's forward or LM head, the sampler,
/// or the device under either.
#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    /// The model failed (its forward or LM head).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Sampling failed (non-finite logits, a malformed query).
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// A tensor operation of the seam itself failed (device error, out of memory).
    #[error(transparent)]
    Device(#[from] candle_core::Error),
    /// The rows, keys and queries of a call disagree (a bug in the caller).
    #[error("invalid batch: {0}")]
    Batch(String),
}

impl ScoringError {
    /// A short label of the failing part: `sampler`, `device` or `model`.
    pub fn kind(&self) -> &'static str {
        match self {
            ScoringError::Sampler(_) => "sampler",
            ScoringError::Device(_) | ScoringError::Model(ModelError::Candle(_)) => "device",
            ScoringError::Model(_) | ScoringError::Batch(_) => "model",
        }
    }
}

/// What the engine runs a batch on: the model's forward over a packed batch,
/// then the LM head and the sampler for chosen rows of its result.
/// [`TeacherBackend`] is the real one; tests use fakes with no model.
pub trait ScoringBackend: Send + 'static {
    /// The forward's result for one packed batch (hidden states).
    type Hidden;

    /// Runs the model over `batch`.
    fn forward(&mut self, batch: &PackedBatch) -> Result<Self::Hidden, ScoringError>;

    /// Whether [`Self::forward`] computes a shared prefix once; when not, the
    /// engine packs batches unshared (the result is the same either way).
    fn shares_prefixes(&self) -> bool {
        false
    }

    /// Appends one sampled row per entry of `rows` (token indices of the
    /// batch, keyed by `keys`, scored as `queries` ask) to `out`.
    fn sample(
        &mut self,
        hidden: &Self::Hidden,
        rows: &[u32],
        keys: &[RowKey],
        queries: RowQueries<'_>,
        params: &SamplingParams,
        out: &mut SampledRows,
    ) -> Result<(), ScoringError>;

    /// Waits until the device work queued from this thread has finished, so
    /// that another thread may use its results.
    fn settle(&self) -> Result<(), ScoringError>;
}

/// The teacher model and the sampler backend of its device.
pub struct TeacherBackend {
    teacher: Teacher,
    sampler: SamplerBackend,
}

impl ScoringBackend for TeacherBackend {
    type Hidden = candle_core::Tensor;

    fn forward(&mut self, batch: &PackedBatch) -> Result<Self::Hidden, ScoringError> {
        Ok(self.teacher.hidden_states(batch)?)
    }

    fn shares_prefixes(&self) -> bool {
        self.teacher.shares_prefixes()
    }

    fn sample(
        &mut self,
        hidden: &Self::Hidden,
        rows: &[u32],
        keys: &[RowKey],
        queries: RowQueries<'_>,
        params: &SamplingParams,
        out: &mut SampledRows,
    ) -> Result<(), ScoringError> {
        self.sampler.sample(&self.teacher, hidden, rows, keys, queries, params, out)
    }

    fn settle(&self) -> Result<(), ScoringError> {
        Ok(device::settle(self.teacher.device())?)
    }
}

impl TeacherBackend {
    /// The teacher and the sampler backend of its device, with
    /// `head_chunk_rows` rows per LM-head chunk (by default the sampler
    /// backend's choice for the device).
    pub fn new(teacher: Teacher, head_chunk_rows: Option<usize>) -> Result<Self, ScoringError> {
        let sampler =
            SamplerBackend::new(teacher.device(), teacher.config().vocab_size, head_chunk_rows)?;
        Ok(Self { teacher, sampler })
    }

    /// The teacher.
    pub fn teacher(&self) -> &Teacher {
        &self.teacher
    }
}
