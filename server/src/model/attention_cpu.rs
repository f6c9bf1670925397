//! Causal attention over a packed batch on the CPU, in f32, fused into one op.
//!
//! The tiled attention of [`super::teacher`] materialises every tile's scores
//! (heads × query rows × keys) as tensors and passes over them five times
//! (scale, soft-cap, mask, softmax, the second matmul), each pass a trip to
//! memory once a sequence is long (9 heads × 1024² scores are 38 MB), and it
//! multiplies every query by every key of its sequence, the half above the
//! diagonal included. Here the work is cut into items of one sequence, one
//! head and one block of at most [`DEFAULT_QUERY_BLOCK`] query rows, run in
//! parallel on candle's thread pool (rayon). An item
//!
//! 1. multiplies its queries by the keys its block can see — from the block's
//!    first visible key to its last query, so keys after the block (the
//!    causal upper triangle) and before a sliding window are never read — into
//!    a scratch buffer of rows × keys that stays in the cache (`gemm`, single
//!    threaded),
//! 2. scales, soft-caps and softmaxes each row over exactly its visible keys
//!    (the rest set to 0), with the exponential of the CPU sampler
//!    ([`exps_below_max`], vectorised, the same bits as `f32::exp`),
//! 3. multiplies the probabilities by the values straight into the output rows
//!    [tokens, heads × head_dim] that the output projection reads.
//!
//! Queries, keys and values are read in the layout the projections produce
//! ([tokens, heads, head_dim]), so nothing is transposed or copied.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, backend::BackendStorage, bail};
use rayon::prelude::*;

use crate::sampler::cpu::exps_below_max;

/// Query rows per work item: at 1,024 keys the item's scores and
/// probabilities are 2 × 256 KiB, within a core's L2 cache.
pub const DEFAULT_QUERY_BLOCK: usize = 64;

/// Causal (optionally sliding-window) attention of packed sequences; see the
/// module documentation. Inputs q [tokens, heads, head_dim], k and v [tokens,
/// kv_heads, head_dim], all contiguous f32 on the CPU; output [tokens, heads ×
/// head_dim] f32. Query head h reads key/value head h / (heads / kv_heads).
#[derive(Debug, Clone)]
pub struct PackedCausalAttention {
    /// Token ranges of the sequences, in order, covering all tokens.
    pub sequences: Vec<Range<usize>>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query i sees key j when j ≤ i and, with a window W, i − j < W.
    pub window: Option<usize>,
    /// Multiplies the scores (in f32) before the soft-cap.
    pub scale: f32,
    /// Scores s become tanh(s · (1 / cap)) · cap (1 / cap rounded once to f32).
    pub softcap: Option<f64>,
    /// Query rows per work item (at least 1).
    pub query_block: usize,
}

/// One work item: a block of one sequence's queries for one head.
#[derive(Debug, Clone, Copy)]
struct Item {
    head: usize,
    queries: (usize, usize),
    keys_start: usize,
}

/// The output pointer shared by the items, which write disjoint rows × columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every item writes its own (query rows, head columns) of the output
// and nothing reads it until all items are done.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The first key query `i` sees, given its sequence's first token `start`: `start`,
/// or with a window W the key W − 1 before it.
pub(super) fn first_visible_key(i: usize, window: Option<usize>, start: usize) -> usize {
    match window {
        Some(w) => (i + 1).saturating_sub(w).max(start),
        None => start,
    }
}

impl PackedCausalAttention {
    fn items(&self) -> Vec<Item> {
        let block = self.query_block.max(1);
        let mut items = Vec::new();
        for seq in &self.sequences {
            let mut q0 = seq.start;
            while q0 < seq.end {
                let q1 = (q0 + block).min(seq.end);
                let keys_start = first_visible_key(q0, self.window, seq.start);
                for head in 0..self.heads {
                    items.push(Item { head, queries: (q0, q1), keys_start });
                }
                q0 = q1;
            }
        }
        // The largest items first, so that the last ones to run are short.
        items.sort_by_key(|it| std::cmp::Reverse(it.queries.1 - it.keys_start));
        items
    }

    fn check(&self, tokens: usize) -> candle_core::Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!("attention: {} heads do not share {} kv heads evenly", self.heads, self.kv_heads);
        }
        let mut next = 0;
        for s in &self.sequences {
            if s.start != next || s.end <= s.start {
                bail!("attention: sequence {s:?} does not follow token {next} or is empty");
            }
            next = s.end;
        }
        if next != tokens {
            bail!("attention: the sequences cover {next} tokens, the batch has {tokens}");
        }
        if self.window == Some(0) {
            bail!("attention: a window of 0 keys");
        }
        Ok(())
    }

    /// Runs the attention on slices (see the type's documentation for layouts).
    fn run(&self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let groups = nh / nkv;
        let out_ptr = OutPtr(out.as_mut_ptr());
        let softcap = self.softcap.map(|c| ((1.0 / c) as f32, c as f32));
        let items = self.items();
        items.par_iter().for_each_init(
            || (Vec::<f32>::new(), Vec::<f32>::new()),
            |(scores, probs), item| {
                let (q0, q1) = item.queries;
                let (rows, keys) = (q1 - q0, q1 - item.keys_start);
                let kvh = item.head / groups;
                // The matmul writes every score; the probabilities of keys a
                // row cannot see must be 0.
                scores.resize(rows * keys, 0.0);
                probs.clear();
                probs.resize(rows * keys, 0.0);
                let kv_offset = (item.keys_start * nkv + kvh) * hd;
                let q_offset = (q0 * nh + item.head) * hd;
                // 1. scores = Q K^T: Q rows of stride nh·hd; K^T (hd × keys)
                // has column j at key j (stride nkv·hd) and row d at dim d.
                // SAFETY: every index read is within q and k (query rows
                // q0..q1 and keys keys_start..q1 of this head's columns), and
                // `scores` holds rows × keys.
                unsafe {
                    matmul(
                        (rows, keys, hd),
                        (scores.as_mut_ptr(), keys),
                        (q.as_ptr().add(q_offset), nh * hd),
                        (k.as_ptr().add(kv_offset), 1, nkv * hd),
                    );
                }
                // 2. the softmax of each row over its visible keys.
                for (r, (srow, prow)) in
                    scores.chunks_exact_mut(keys).zip(probs.chunks_exact_mut(keys)).enumerate()
                {
                    let i = q0 + r;
                    let first = first_visible_key(i, self.window, item.keys_start);
                    let (lo, hi) = (first - item.keys_start, i + 1 - item.keys_start);
                    softmax_row(&mut srow[lo..hi], &mut prow[lo..hi], self.scale, softcap);
                }
                // 3. out rows q0..q1, this head's columns = P V.
                // SAFETY: V rows keys_start..q1 of this kv head are within v;
                // the output rows q0..q1 × columns head·hd..(head+1)·hd are
                // within `out` and written by this item only.
                unsafe {
                    let out = out_ptr;
                    matmul(
                        (rows, hd, keys),
                        (out.0.add(q0 * nh * hd + item.head * hd), nh * hd),
                        (probs.as_ptr(), keys),
                        (v.as_ptr().add(kv_offset), nkv * hd, 1),
                    );
                }
            },
        );
    }
}

/// dst = lhs · rhs for (m, n, k), single-threaded: dst (pointer, row stride)
/// and lhs (pointer, row stride) have unit column stride; rhs is (pointer, row
/// stride, column stride).
///
/// # Safety
/// Every element of the three matrices so described must be in bounds, and
/// dst must not overlap the others or be written by another thread meanwhile.
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_rs): (*const f32, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// probs = softmax(cap(scores · scale)) of one row's visible keys, as the tiled
/// path computes it: the scale and soft-cap in f32, e = exp(s − max), the sum
/// of the e in f32, then each e divided by it. `scores` is overwritten.
/// `softcap` is (1 / cap, cap).
fn softmax_row(scores: &mut [f32], probs: &mut [f32], scale: f32, softcap: Option<(f32, f32)>) {
    match softcap {
        Some((inv, cap)) => {
            for s in scores.iter_mut() {
                *s = (*s * scale * inv).tanh() * cap;
            }
        }
        None => {
            for s in scores.iter_mut() {
                *s *= scale;
            }
        }
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
    exps_below_max(scores, max, probs);
    // Eight running sums side by side (independent chains that vectorise).
    let mut lanes = [0f32; 8];
    let chunks = probs.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    let sum = lanes.iter().sum::<f32>() + rest;
    for p in probs.iter_mut() {
        *p /= sum;
    }
}

/// The f32 data of an operand, checked to be [tokens, heads, head_dim] and
/// contiguous.
fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    (tokens, heads, hd): (usize, usize, usize),
    name: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("attention: {name} is {:?}, not f32", s.dtype());
    };
    if l.shape().dims() != [tokens, heads, hd] {
        bail!("attention: {name} is {:?}, not [{tokens}, {heads}, {hd}]", l.shape());
    }
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("attention: {name} is not contiguous"),
    }
}

impl CustomOp3 for PackedCausalAttention {
    fn name(&self) -> &'static str {
        "packed-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let tokens = lq.shape().dims().first().copied().unwrap_or(0);
        self.check(tokens)?;
        let (q, k, v) = (
            f32_slice(q, lq, (tokens, nh, hd), "q")?,
            f32_slice(k, lk, (tokens, nkv, hd), "k")?,
            f32_slice(v, lv, (tokens, nkv, hd), "v")?,
        );
        let mut out = vec![0f32; tokens * nh * hd];
        self.run(q, k, v, &mut out);
        Ok((CpuStorage::F32(out), Shape::from_dims(&[tokens, nh * hd])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// The attention in f64 from its definition, one query at a time.
    fn reference(q: &[f32], k: &[f32], v: &[f32], op: &PackedCausalAttention) -> Vec<f64> {
        let (nh, nkv, hd) = (op.heads, op.kv_heads, op.head_dim);
        let n = q.len() / (nh * hd);
        let mut out = vec![0f64; n * nh * hd];
        for seq in &op.sequences {
            for i in seq.clone() {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let visible: Vec<usize> = seq
                        .clone()
                        .filter(|&j| j <= i && op.window.is_none_or(|w| i - j < w))
                        .collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            let dot: f64 = (0..hd)
                                .map(|d| {
                                    f64::from(q[(i * nh + h) * hd + d])
                                        * f64::from(k[(j * nkv + kvh) * hd + d])
                                })
                                .sum();
                            let s = dot * f64::from(op.scale);
                            match op.softcap {
                                Some(c) => (s / c).tanh() * c,
                                None => s,
                            }
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        out[(i * nh + h) * hd + d] = visible
                            .iter()
                            .zip(&e)
                            .map(|(&j, e)| e / sum * f64::from(v[(j * nkv + kvh) * hd + d]))
                            .sum();
                    }
                }
            }
        }
        out
    }

    fn random(len: usize, rng: &mut StdRng, spread: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-spread..spread)).collect()
    }

    fn run_op(op: &PackedCausalAttention, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let n = q.len() / (op.heads * op.head_dim);
        let dev = Device::Cpu;
        let t = |x: &[f32], h: usize| Tensor::from_slice(x, (n, h, op.head_dim), &dev).unwrap();
        let (q, k, v) = (t(q, op.heads), t(k, op.kv_heads), t(v, op.kv_heads));
        let out = q.apply_op3_no_bwd(&k, &v, op).unwrap();
        assert_eq!(out.dims(), [n, op.heads * op.head_dim]);
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Several sequences (1 token to a few blocks), grouped heads, every query
    /// block size from one row up, with and without a window and a soft-cap:
    /// within 2e-6 of the f64 attention (relative to the largest |value|).
    #[test]
    fn matches_the_attention_computed_in_f64() {
        let mut rng = StdRng::seed_from_u64(7);
        let lens = [1usize, 37, 130, 64, 5];
        let mut sequences = vec![];
        let mut next = 0;
        for l in lens {
            sequences.push(next..next + l);
            next += l;
        }
        let n = next;
        for (heads, kv_heads, hd) in [(4, 2, 16), (3, 3, 8), (6, 1, 32)] {
            let q = random(n * heads * hd, &mut rng, 1.5);
            let k = random(n * kv_heads * hd, &mut rng, 1.5);
            let v = random(n * kv_heads * hd, &mut rng, 1.0);
            for window in [None, Some(1), Some(4), Some(50)] {
                for softcap in [None, Some(3.0)] {
                    let mut op = PackedCausalAttention {
                        sequences: sequences.clone(),
                        heads,
                        kv_heads,
                        head_dim: hd,
                        window,
                        scale: 1.0 / (hd as f32).sqrt(),
                        softcap,
                        query_block: 1,
                    };
                    let want = reference(&q, &k, &v, &op);
                    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
                    for block in [1, 3, 16, DEFAULT_QUERY_BLOCK, 1000] {
                        op.query_block = block;
                        let got = run_op(&op, &q, &k, &v);
                        for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                            let d = (f64::from(*g) - w).abs() / scale;
                            assert!(
                                d <= 2e-6,
                                "heads {heads}/{kv_heads} hd {hd} window {window:?} softcap \
                                 {softcap:?} block {block}: element {idx}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Scores far apart (a row whose max is 80 above the rest) still give a
    /// softmax of 1 on the max and 0 elsewhere, and nothing is NaN.
    #[test]
    fn a_dominant_key_takes_all_the_weight() {
        let (heads, hd) = (1, 4);
        let n = 3;
        // Query 2 sees keys 0, 1, 2; key 1 scores 80 · 4 = 320 higher.
        let q = vec![1f32; n * hd];
        let mut k = vec![0f32; n * hd];
        k[hd..2 * hd].fill(80.0);
        let v: Vec<f32> = (0..n * hd).map(|x| x as f32).collect();
        let op = PackedCausalAttention {
            sequences: std::iter::once(0..n).collect(),
            heads,
            kv_heads: 1,
            head_dim: hd,
            window: None,
            scale: 1.0,
            softcap: None,
            query_block: 2,
        };
        let got = run_op(&op, &q, &k, &v);
        assert_eq!(&got[0..hd], &v[0..hd], "query 0 sees only key 0");
        assert_eq!(&got[2 * hd..3 * hd], &v[hd..2 * hd], "query 2 is all key 1");
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let dev = Device::Cpu;
        let op = PackedCausalAttention {
            sequences: vec![0..2, 2..4],
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            window: None,
            scale: 1.0,
            softcap: None,
            query_block: 64,
        };
        let q = Tensor::zeros((4, 2, 4), candle_core::DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((4, 1, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(q.apply_op3_no_bwd(&kv, &kv, &op).is_ok());
        let short = Tensor::zeros((3, 1, 4), candle_core::DType::F32, &dev).unwrap();
        let e = q.apply_op3_no_bwd(&short, &kv, &op).unwrap_err().to_string();
        assert!(e.contains("not [4, 1, 4]"), "{e}");
        let mut gaps = op.clone();
        gaps.sequences = vec![0..2, 3..4];
        let e = q.apply_op3_no_bwd(&kv, &kv, &gaps).unwrap_err().to_string();
        assert!(e.contains("does not follow"), "{e}");
        let f64q = q.to_dtype(candle_core::DType::F64).unwrap();
        let e = f64q.apply_op3_no_bwd(&kv, &kv, &op).unwrap_err().to_string();
        assert!(e.contains("not f32"), "{e}");
    }
}
