//! `distill_loss_reference`: the Rust `logitd_client::distill_loss` on padded
//! targets, as a reference for the PyTorch loss.

use candle_core::{DType, Device, Tensor};
use logitd_client::{LossOptions, Normalization, Target, TeacherTargets, distill_loss};
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::{exceptions::PyValueError, prelude::*};

fn value_error(m: String) -> PyErr {
    PyValueError::new_err(m)
}

/// Rows [N, K] of a 2-D array as a contiguous slice.
fn rows<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray2<'_, T>,
    name: &str,
    shape: (usize, usize),
) -> PyResult<&'a [T]> {
    let got = a.shape();
    if got != [shape.0, shape.1] {
        return Err(value_error(format!("{name} has shape {got:?}, expected {shape:?}")));
    }
    a.as_slice().map_err(|_| value_error(format!("{name} is not C-contiguous")))
}

/// The loss of `student_logits` ([N, V], float64 or float32) against padded
/// targets (`token_ids`, `logprobs`, `counts`, `mask`: [N, K]), computed by
/// the Rust client's `distill_loss`. See `_native.pyi` for the definition.
#[pyfunction]
#[pyo3(signature = (student_logits, token_ids, logprobs, counts, mask, num_samples, target = "renormalized", normalization = "full", position_weights = None))]
#[allow(clippy::too_many_arguments)]
pub fn distill_loss_reference(
    student_logits: &Bound<'_, PyAny>,
    token_ids: PyReadonlyArray2<'_, i64>,
    logprobs: PyReadonlyArray2<'_, f32>,
    counts: PyReadonlyArray2<'_, i32>,
    mask: PyReadonlyArray2<'_, bool>,
    num_samples: u32,
    target: &str,
    normalization: &str,
    position_weights: Option<PyReadonlyArray1<'_, f32>>,
) -> PyResult<f64> {
    let target = match target {
        "renormalized" => Target::Renormalized,
        "counts" => Target::Counts,
        other => {
            return Err(value_error(format!(
                "target {other:?}: expected \"renormalized\" or \"counts\""
            )));
        }
    };
    let normalization = match normalization {
        "full" => Normalization::FullVocab,
        "sampled" => Normalization::Sampled,
        other => {
            return Err(value_error(format!(
                "normalization {other:?}: expected \"full\" or \"sampled\""
            )));
        }
    };
    let (logits, n, v) = if let Ok(a) = student_logits.extract::<PyReadonlyArray2<'_, f64>>() {
        let [n, v] = [a.shape()[0], a.shape()[1]];
        (Tensor::from_slice(rows(&a, "student_logits", (n, v))?, (n, v), &Device::Cpu), n, v)
    } else if let Ok(a) = student_logits.extract::<PyReadonlyArray2<'_, f32>>() {
        let [n, v] = [a.shape()[0], a.shape()[1]];
        (Tensor::from_slice(rows(&a, "student_logits", (n, v))?, (n, v), &Device::Cpu), n, v)
    } else {
        return Err(value_error(
            "student_logits must be a 2-D float64 or float32 numpy array [N, V]".into(),
        ));
    };
    let logits = logits.map_err(|e| value_error(e.to_string()))?;
    let k = token_ids.shape().get(1).copied().unwrap_or(0);
    let ids = rows(&token_ids, "token_ids", (n, k))?;
    let lp = rows(&logprobs, "logprobs", (n, k))?;
    let cs = rows(&counts, "counts", (n, k))?;
    let ms = rows(&mask, "mask", (n, k))?;

    // One CSR position per row; a row without entries gets a placeholder entry
    // and position weight 0 (TeacherTargets needs an id per position).
    let mut t = TeacherTargets::one_hot(&[]);
    t.num_samples = num_samples;
    let mut weights = Vec::with_capacity(n);
    for row in 0..n {
        let mut any = false;
        for j in 0..k {
            let i = row * k + j;
            if ms[i] {
                let id = u32::try_from(ids[i]).map_err(|_| {
                    value_error(format!("token_ids[{row}, {j}] = {} is not a valid id", ids[i]))
                })?;
                let c = u32::try_from(cs[i]).map_err(|_| {
                    value_error(format!("counts[{row}, {j}] = {} is negative", cs[i]))
                })?;
                t.token_ids.push(id);
                t.counts.push(c);
                t.logprobs.push(lp[i]);
                any = true;
            }
        }
        if !any {
            t.token_ids.push(0);
            t.counts.push(1);
            t.logprobs.push(0.0);
        }
        t.offsets.push(t.token_ids.len() as u32);
        t.lse.push(0.0);
        weights.push(if any { 1.0f32 } else { 0.0 });
    }
    if let Some(w) = position_weights {
        let w =
            w.as_slice().map_err(|_| value_error("position_weights is not contiguous".into()))?;
        if w.len() != n {
            return Err(value_error(format!("{} position_weights for {n} rows", w.len())));
        }
        for (a, b) in weights.iter_mut().zip(w) {
            *a *= *b;
        }
    }
    let loss = distill_loss(&logits, &t, LossOptions { target, normalization }, Some(&weights))
        .map_err(|e| value_error(e.to_string()))?;
    let _ = v;
    loss.to_dtype(DType::F64)
        .and_then(|l| l.to_scalar::<f64>())
        .map_err(|e| value_error(e.to_string()))
}
