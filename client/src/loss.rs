//! The distillation loss against sparse teacher targets.
//!
//! For a position with sampled set S, target weights w_i (i ∈ S, Σ w_i = 1) and
//! student logits x ∈ R^V, the loss is −Σ_{i∈S} w_i · log q_i, where
//! - [`Target::Renormalized`] (Gemma 2/3): w_i = p_i / Σ_{j∈S} p_j;
//! - [`Target::Counts`] (RS-KD): w_i = c_i / Σ_{j∈S} c_j, an unbiased estimate of
//!   the full teacher distribution;
//! - [`Normalization::FullVocab`]: log q = log_softmax(x) over the whole vocabulary;
//! - [`Normalization::Sampled`]: log q = log_softmax of x restricted to S.
//!
//! Since Σ w_i = 1, −Σ w_i log q_i = log Z − Σ w_i x_i with Z the student's
//! normaliser (over V or over S), so the loss needs one gather of the sampled
//! logits and one log-sum-exp per position. Only composed candle ops are used
//! (no fused softmax), so gradients flow to the student logits.

use candle_core::Tensor;

use crate::TeacherTargets;

/// Which teacher weights the sampled ids get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// p_i / Σ_S p: the teacher's probabilities renormalised over the sampled
    /// set (the Gemma 2/3 recipe). Biased toward the head, low variance.
    #[default]
    Renormalized,
    /// c_i / Σ_S c: the empirical frequencies of the draws (RS-KD), an unbiased
    /// estimate of the full-distribution cross-entropy.
    Counts,
}

/// Over which ids the student's softmax is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalization {
    /// log_softmax over the whole vocabulary.
    #[default]
    FullVocab,
    /// log_softmax over the sampled ids of each position only.
    Sampled,
}

/// How [`distill_loss`] weighs and normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LossOptions {
    /// Teacher weights.
    pub target: Target,
    /// Student normalisation.
    pub normalization: Normalization,
}

/// Why the loss could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// The student logits are not [positions, vocab] with one row per target position.
    #[error("student logits have shape {got:?}, expected [{positions}, vocab]")]
    Shape {
        /// The shape given.
        got: Vec<usize>,
        /// Positions in the targets.
        positions: usize,
    },
    /// A sampled id is outside the student's vocabulary.
    #[error(
        "teacher id {id} at target position {position} is outside the student vocabulary of {vocab}"
    )]
    IdOutOfRange {
        /// The id.
        id: u32,
        /// Target position.
        position: usize,
        /// Student vocabulary size.
        vocab: usize,
    },
    /// The position weights do not have one value per position, or one is negative or not finite.
    #[error("position weights: {0}")]
    PositionWeights(String),
    /// The targets are malformed.
    #[error(transparent)]
    Targets(#[from] crate::TargetsError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TeacherTargets {
    /// The target weights of position `p` (they sum to 1), in f64.
    pub fn weights(&self, p: usize, target: Target) -> Vec<f64> {
        let r = self.range(p);
        match target {
            Target::Renormalized => {
                let l = &self.logprobs[r];
                let m = l.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
                let e: Vec<f64> = l.iter().map(|&v| (f64::from(v) - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(|e| e / s).collect()
            }
            Target::Counts => {
                let c = &self.counts[r];
                let s: f64 = c.iter().map(|&c| f64::from(c)).sum();
                c.iter().map(|&c| f64::from(c) / s).collect()
            }
        }
    }
}

/// The distillation loss of `student_logits` ([positions, V], any float dtype)
/// against `targets`: the weighted mean over positions of −Σ_{i∈S} w_i log q_i.
///
/// `position_weights` (one per position, ≥ 0; e.g. a 0/1 loss mask) weighs the
/// mean; `None` weighs all positions equally. If every weight is 0 the loss is
/// 0 with zero gradients. The result is a scalar in the logits' dtype, with
/// gradients to `student_logits`.
pub fn distill_loss(
    student_logits: &Tensor,
    targets: &TeacherTargets,
    options: LossOptions,
    position_weights: Option<&[f32]>,
) -> Result<Tensor, LossError> {
    targets.validate()?;
    let positions = targets.num_positions();
    let (rows, vocab) = match student_logits.dims() {
        &[rows, vocab] if rows == positions => (rows, vocab),
        dims => return Err(LossError::Shape { got: dims.to_vec(), positions }),
    };
    let mask: Vec<f64> = match position_weights {
        None => vec![1.0; rows],
        Some(w) if w.len() != rows => {
            return Err(LossError::PositionWeights(format!(
                "{} weights for {rows} positions",
                w.len()
            )));
        }
        Some(w) => {
            if let Some(p) = w.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(LossError::PositionWeights(format!(
                    "weight {} at position {p} is not a finite value >= 0",
                    w[p]
                )));
            }
            w.iter().map(|&v| f64::from(v)).collect()
        }
    };
    let total: f64 = mask.iter().sum();
    let scale = if total > 0.0 { 1.0 / total } else { 0.0 };

    // One padded row of `width` gathered entries per position; padding gathers
    // the position's first id with weight 0 (and -inf in the sampled softmax).
    let width = (0..rows).map(|p| targets.range(p).len()).max().unwrap_or(0);
    let mut index = Vec::with_capacity(rows * width);
    let mut weight = Vec::with_capacity(rows * width);
    let mut pad = Vec::with_capacity(rows * width);
    for (p, &position_weight) in mask.iter().enumerate() {
        let r = targets.range(p);
        let ids = &targets.token_ids[r.clone()];
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(LossError::IdOutOfRange { id, position: p, vocab });
        }
        let row = (p * vocab) as i64;
        let w = targets.weights(p, options.target);
        for j in 0..width {
            let real = j < ids.len();
            index.push(row + i64::from(ids[if real { j } else { 0 }]));
            weight.push(if real { w[j] * position_weight * scale } else { 0.0 });
            pad.push(if real { 0.0 } else { f64::NEG_INFINITY });
        }
    }
    let dev = student_logits.device();
    let dtype = student_logits.dtype();
    let index = Tensor::from_vec(index, rows * width, dev)?;
    let weight = Tensor::from_vec(weight, (rows, width), dev)?.to_dtype(dtype)?;
    let gathered = student_logits.flatten_all()?.index_select(&index, 0)?.reshape((rows, width))?;

    let log_z = match options.normalization {
        Normalization::FullVocab => log_sum_exp_rows(student_logits)?,
        Normalization::Sampled => {
            let pad = Tensor::from_vec(pad, (rows, width), dev)?.to_dtype(dtype)?;
            log_sum_exp_rows(&(&gathered + pad)?)?
        }
    };
    // Σ_p b_p log Z_p − Σ w x, with b_p = Σ_i w_pi (the position's share).
    let share = weight.sum_keepdim(1)?;
    let loss = ((share * log_z)?.sum_all()? - (weight * gathered)?.sum_all()?)?;
    Ok(loss)
}

/// log Σ_j exp(x_ij) per row, as [rows, 1], with the max shift held constant
/// (the shift cancels in the value and in the gradient).
fn log_sum_exp_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let shift = x.max_keepdim(1)?.detach();
    x.broadcast_sub(&shift)?.exp()?.sum_keepdim(1)?.log()? + shift
}
