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
//! - [`formats`] (feature `parquet`, on by default): target shards as Parquet
//!   in Axolotl's and DistillKit's layouts, which [`shard::ShardReader`] reads
//!   back.
//! - [`student`]: a small Llama-style student (composed ops) for examples and tests.
//!
//! The command-line tools (`logitd-client dump`, `logitd-bench`) and the
//! corpus readers are the `logitd-client-tools` crate (client/tools): this
//! library has no command-line dependencies. Its errors are typed
//! ([`ClientError`], [`shard::ShardError`], [`TargetsError`], [`LossError`]).

mod client;
#[cfg(feature = "parquet")]
pub mod formats;
mod loss;
mod prefetch;
pub mod shard;
pub mod student;
mod targets;

pub use client::{
    Candidates, ClientConfig, ClientError, RawTeacherClient, RetryPolicy, SampleOptions,
    TeacherClient, explain_status, seeded_sequences, sequence_seed,
};
/// The enums of [`SampleOptions`], from the wire protocol.
pub use logitd_proto::v1::{SamplingMethod, ValueEncoding};
pub use loss::{LossError, LossOptions, Normalization, Target, distill_loss};
pub use prefetch::{Prefetched, Prefetcher, TrainingBatch};
pub use targets::{TargetsError, TeacherTargets};
