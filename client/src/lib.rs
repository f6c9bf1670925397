//! logitd-client: what a student trainer needs from a logitd teacher.
//!
//! - [`TeacherTargets`]: the sparse teacher target of a sequence (distinct sampled
//!   ids, their counts and the teacher's log-probabilities, per position), decoded
//!   from the wire.
//! - [`distill_loss`]: the distillation cross-entropy of student logits against
//!   those targets, as a differentiable candle scalar.

mod loss;
mod targets;

pub use loss::{LossError, LossOptions, Normalization, Target, distill_loss};
pub use targets::{TargetsError, TeacherTargets};
