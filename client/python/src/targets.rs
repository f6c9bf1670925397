//! Teacher targets as numpy arrays (the columns of `logitd.Targets`) and their
//! dense padded form.

use logitd_client::TeacherTargets;
use numpy::{
    IntoPyArray, PyArray1, PyReadonlyArray1,
    ndarray::{Array2, Array3},
};
use pyo3::{exceptions::PyValueError, prelude::*, types::PyTuple};

/// The columns of a batch's targets, concatenated over its sequences.
#[derive(Default)]
pub(crate) struct Columns {
    pub offsets: Vec<i64>,
    pub token_ids: Vec<i64>,
    pub counts: Vec<i32>,
    pub logprobs: Vec<f32>,
    pub lse: Vec<f32>,
    pub seq_offsets: Vec<i64>,
    pub first_positions: Vec<i64>,
    pub lengths: Vec<i64>,
    pub num_samples: u32,
    /// Per position (NaN where no next token was scored), when any sequence
    /// has them.
    pub token_logprobs: Option<Vec<f32>>,
    /// Per position, aligned with `token_logprobs` (0 where none).
    pub token_ranks: Option<Vec<i32>>,
    /// positions + 1 entries over `candidate_logprobs`, when any sequence has
    /// candidates (a sequence without them has none at each position).
    pub candidate_offsets: Option<Vec<i64>>,
    pub candidate_logprobs: Option<Vec<f32>>,
}

impl Columns {
    /// Concatenates `targets` (one per sequence). `lengths[b]` is sequence b's
    /// length; `None` derives it as first_position + returned positions (what
    /// the server returns for a whole sequence).
    pub fn new(targets: &[TeacherTargets], lengths: Option<Vec<i64>>) -> Self {
        let positions: usize = targets.iter().map(TeacherTargets::num_positions).sum();
        let entries: usize = targets.iter().map(|t| t.token_ids.len()).sum();
        let mut c = Columns {
            offsets: Vec::with_capacity(positions + 1),
            token_ids: Vec::with_capacity(entries),
            counts: Vec::with_capacity(entries),
            logprobs: Vec::with_capacity(entries),
            lse: Vec::with_capacity(positions),
            seq_offsets: Vec::with_capacity(targets.len() + 1),
            first_positions: Vec::with_capacity(targets.len()),
            lengths: lengths.unwrap_or_else(|| {
                targets
                    .iter()
                    .map(|t| i64::from(t.first_position) + t.num_positions() as i64)
                    .collect()
            }),
            num_samples: targets.first().map_or(0, |t| t.num_samples),
            ..Self::default()
        };
        if targets.iter().any(|t| !t.token_logprobs.is_empty()) {
            c.token_logprobs = Some(Vec::with_capacity(positions));
            c.token_ranks = Some(Vec::with_capacity(positions));
        }
        if targets.iter().any(|t| !t.candidate_offsets.is_empty()) {
            let n = targets.iter().map(|t| t.candidate_logprobs.len()).sum();
            c.candidate_offsets = Some(Vec::with_capacity(positions + 1));
            c.candidate_logprobs = Some(Vec::with_capacity(n));
        }
        c.offsets.push(0);
        c.seq_offsets.push(0);
        if let Some(o) = c.candidate_offsets.as_mut() {
            o.push(0);
        }
        for t in targets {
            let p = t.num_positions();
            if let (Some(lp), Some(ranks)) = (c.token_logprobs.as_mut(), c.token_ranks.as_mut()) {
                if t.token_logprobs.is_empty() {
                    lp.extend(std::iter::repeat_n(f32::NAN, p));
                    ranks.extend(std::iter::repeat_n(0, p));
                } else {
                    lp.extend_from_slice(&t.token_logprobs);
                    ranks.extend(t.token_ranks.iter().map(|&r| r as i32));
                }
            }
            if let (Some(off), Some(lp)) =
                (c.candidate_offsets.as_mut(), c.candidate_logprobs.as_mut())
            {
                let base = lp.len() as i64;
                if t.candidate_offsets.is_empty() {
                    off.extend(std::iter::repeat_n(base, p));
                } else {
                    off.extend(t.candidate_offsets[1..].iter().map(|&o| base + i64::from(o)));
                    lp.extend_from_slice(&t.candidate_logprobs);
                }
            }
            let base = c.token_ids.len() as i64;
            c.offsets.extend(t.offsets[1..].iter().map(|&o| base + i64::from(o)));
            c.token_ids.extend(t.token_ids.iter().map(|&i| i64::from(i)));
            c.counts.extend(t.counts.iter().map(|&n| n as i32));
            c.logprobs.extend_from_slice(&t.logprobs);
            c.lse.extend_from_slice(&t.lse);
            c.seq_offsets.push(c.lse.len() as i64);
            c.first_positions.push(i64::from(t.first_position));
        }
        c
    }

    /// `(offsets, token_ids, counts, logprobs, lse, seq_offsets,
    /// first_positions, lengths, num_samples, token_logprobs, token_ranks,
    /// candidate_offsets, candidate_logprobs)`, the arrays owning the vectors
    /// (the last four None when absent).
    pub fn into_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
        fn opt<'py, T: numpy::Element>(py: Python<'py>, v: Option<Vec<T>>) -> Bound<'py, PyAny> {
            match v {
                Some(v) => PyArray1::from_vec(py, v).into_any(),
                None => py.None().into_bound(py),
            }
        }
        PyTuple::new(
            py,
            [
                PyArray1::from_vec(py, self.offsets).into_any(),
                PyArray1::from_vec(py, self.token_ids).into_any(),
                PyArray1::from_vec(py, self.counts).into_any(),
                PyArray1::from_vec(py, self.logprobs).into_any(),
                PyArray1::from_vec(py, self.lse).into_any(),
                PyArray1::from_vec(py, self.seq_offsets).into_any(),
                PyArray1::from_vec(py, self.first_positions).into_any(),
                PyArray1::from_vec(py, self.lengths).into_any(),
                self.num_samples.into_pyobject(py)?.into_any(),
                opt(py, self.token_logprobs),
                opt(py, self.token_ranks),
                opt(py, self.candidate_offsets),
                opt(py, self.candidate_logprobs),
            ],
        )
    }
}

fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{name} is not contiguous")))
}

/// The dense form of CSR targets: `(token_ids int64, logprobs float32, counts
/// int32, mask bool)` of shape [B, T, K] and `position_mask` bool [B, T], with
/// T = max(lengths) and row t of sequence b holding position t's entries.
#[pyfunction]
#[pyo3(signature = (offsets, token_ids, counts, logprobs, seq_offsets, first_positions, lengths, k_max = None))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn pad<'py>(
    py: Python<'py>,
    offsets: PyReadonlyArray1<'py, i64>,
    token_ids: PyReadonlyArray1<'py, i64>,
    counts: PyReadonlyArray1<'py, i32>,
    logprobs: PyReadonlyArray1<'py, f32>,
    seq_offsets: PyReadonlyArray1<'py, i64>,
    first_positions: PyReadonlyArray1<'py, i64>,
    lengths: PyReadonlyArray1<'py, i64>,
    k_max: Option<usize>,
) -> PyResult<Bound<'py, PyTuple>> {
    let off = slice(&offsets, "offsets")?;
    let ids = slice(&token_ids, "token_ids")?;
    let cs = slice(&counts, "counts")?;
    let lp = slice(&logprobs, "logprobs")?;
    let so = slice(&seq_offsets, "seq_offsets")?;
    let first = slice(&first_positions, "first_positions")?;
    let len = slice(&lengths, "lengths")?;
    let b = first.len();
    let bad = |m: String| Err(PyValueError::new_err(m));
    if so.len() != b + 1 || len.len() != b {
        return bad(format!(
            "{b} sequences but {} seq_offsets and {} lengths",
            so.len(),
            len.len()
        ));
    }
    let p = off.len().saturating_sub(1);
    if so.first().is_some_and(|&s| s != 0)
        || so.windows(2).any(|w| w[1] < w[0])
        || so[b] as usize != p
        || off.first().is_some_and(|&o| o != 0)
        || off.windows(2).any(|w| w[1] < w[0])
        || off.last().is_some_and(|&o| o as usize != ids.len())
        || ids.len() != cs.len()
        || ids.len() != lp.len()
    {
        return bad("the target columns do not fit together".into());
    }
    let t_max = len.iter().copied().max().unwrap_or(0).max(0) as usize;
    let width = |q: usize| (off[q + 1] - off[q]) as usize;
    let k_need = (0..p).map(width).max().unwrap_or(0);
    let k = match k_max {
        None => k_need,
        Some(k) => {
            if let Some(q) = (0..p).find(|&q| width(q) > k) {
                let s = so.partition_point(|&o| o as usize <= q) - 1;
                let t = first[s] as usize + (q - so[s] as usize);
                return bad(format!(
                    "k_max = {k} is smaller than the {} sampled ids of position {t} of sequence {s}",
                    width(q)
                ));
            }
            k
        }
    };
    let mut out_ids = Array3::<i64>::zeros((b, t_max, k));
    let mut out_lp = Array3::<f32>::zeros((b, t_max, k));
    let mut out_counts = Array3::<i32>::zeros((b, t_max, k));
    let mut out_mask = Array3::<bool>::from_elem((b, t_max, k), false);
    let mut pos_mask = Array2::<bool>::from_elem((b, t_max), false);
    for s in 0..b {
        let (p0, p1) = (so[s] as usize, so[s + 1] as usize);
        if first[s] < 0 || first[s] as usize + (p1 - p0) > len[s].max(0) as usize {
            return bad(format!(
                "sequence {s}: {} positions from {} do not fit its length {}",
                p1 - p0,
                first[s],
                len[s]
            ));
        }
        for q in p0..p1 {
            let t = first[s] as usize + (q - p0);
            pos_mask[(s, t)] = true;
            for (j, e) in (off[q] as usize..off[q + 1] as usize).enumerate() {
                out_ids[(s, t, j)] = ids[e];
                out_lp[(s, t, j)] = lp[e];
                out_counts[(s, t, j)] = cs[e];
                out_mask[(s, t, j)] = true;
            }
        }
    }
    PyTuple::new(
        py,
        [
            out_ids.into_pyarray(py).into_any(),
            out_lp.into_pyarray(py).into_any(),
            out_counts.into_pyarray(py).into_any(),
            out_mask.into_pyarray(py).into_any(),
            pos_mask.into_pyarray(py).into_any(),
        ],
    )
}
