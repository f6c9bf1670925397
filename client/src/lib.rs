//! logitd-client: what a student trainer needs from a logitd teacher.
//!
//! - [`TeacherClient`]: connect to one or many servers (balanced), with
//!   deadlines, retries and a tokenizer check; a large batch is split into
//!   concurrent requests and reassembled.
//! - [`Prefetcher`]: keeps N training batches of targets in flight over the
//!   streaming call, in order, with bounded memory.
//! - [`TeacherTargets`]: the sparse teacher target of a sequence (distinct sampled
//!   ids, their counts and the teacher's log-probabilities, per position).
//! - [`distill_loss`]: the distillation cross-entropy of student logits against
//!   those targets, as a differentiable candle scalar.
//! - [`shard`]: targets on disk (safetensors shards), written once and read by
//!   several training runs.
//! - [`corpus`]: token corpora as JSON lines or Parquet, streamed (the input of
//!   `logitd-client dump` and `logitd-bench`).
//! - [`dump`]: the targets of a whole corpus to shards, resumable and split
//!   across workers (`logitd-client dump`).
//! - [`student`]: a small Llama-style student (composed ops) for examples and tests.

mod client;
pub mod corpus;
pub mod dump;
pub mod formats;
mod loss;
mod prefetch;
pub mod shard;
pub mod student;
mod targets;

pub use client::{
    Candidates, ClientConfig, ClientError, RawTeacherClient, RetryPolicy, SampleOptions,
    TeacherClient, seeded_sequences, sequence_seed,
};
/// The enums of [`SampleOptions`], from the wire protocol.
pub use logitd_proto::v1::{SamplingMethod, ValueEncoding};
pub use loss::{LossError, LossOptions, Normalization, Target, distill_loss};
pub use prefetch::{Prefetched, Prefetcher, TrainingBatch};
pub use targets::{TargetsError, TeacherTargets};
