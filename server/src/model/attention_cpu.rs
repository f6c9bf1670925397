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
//!
//! A packed batch is cut into [`Segment`]s. A segment may have a *context*: the
//! tokens of a prefix it shares with other segments, packed once elsewhere in
//! the batch. Its queries then see the context's keys first (positions
//! 0..context.len()) and its own keys after them, as if the prefix were
//! repeated in front of it. For each such segment the keys and values of the
//! context and its own tokens are first copied, per layer, into one buffer
//! laid out as the packed operands are, and its query blocks are cut at the
//! same positions as a sequence's (multiples of the block from position 0):
//! every work item then runs the same matmuls on the same numbers as for the
//! prefix and the segment packed whole, so the result is the same, bit for bit.
//! The copies cost (context + own) × 2 × kv_heads × head_dim floats per segment
//! and layer, far less than the prefix's forward they save.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, backend::BackendStorage, bail};
use rayon::prelude::*;

use crate::kernels::exps_below_max;

/// Query rows per work item: at 1,024 keys the item's scores and
/// probabilities are 2 × 256 KiB, within a core's L2 cache.
pub const DEFAULT_QUERY_BLOCK: usize = 64;

/// A run of packed tokens that attend causally among themselves, after their
/// `context` (the tokens of a shared prefix packed elsewhere in the batch;
/// empty when there is none): token `tokens.start + t` is at position
/// `context.len() + t` and sees every context token and its own tokens up to
/// itself (within a window, counted in positions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub tokens: Range<usize>,
    pub context: Range<usize>,
}

impl Segment {
    /// A segment with no context.
    pub fn alone(tokens: Range<usize>) -> Self {
        let at = tokens.start;
        Self { tokens, context: at..at }
    }

    /// The position of its first token (the context's length).
    pub fn first_position(&self) -> usize {
        self.context.len()
    }
}

/// Causal (optionally sliding-window) attention of packed sequences; see the
/// module documentation. Inputs q [tokens, heads, head_dim], k and v [tokens,
/// kv_heads, head_dim], all contiguous f32 on the CPU; output [tokens, heads ×
/// head_dim] f32. Query head h reads key/value head h / (heads / kv_heads).
#[derive(Debug, Clone)]
pub struct PackedCausalAttention {
    /// The segments, in order, their tokens covering all tokens.
    pub segments: Vec<Segment>,
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

/// One work item: a block of one segment's queries for one head. Its keys are
/// the positions `first_key..` up to its last query, read from `source`.
#[derive(Debug, Clone, Copy)]
struct Item {
    head: usize,
    /// The packed rows it writes.
    queries: (usize, usize),
    /// Rows of the context it computes before them and throws away, so that
    /// the block is the one a sequence packed whole has: the first block of a
    /// segment whose context ends inside a block. They are the `pad` tokens
    /// before packed token `context_end`.
    pad: usize,
    context_end: usize,
    /// The position of its first row (a padding row, if any).
    first_query: usize,
    /// The position of the first key any row of the block sees.
    first_key: usize,
    /// Keys and values of positions 0.. of the segment: the packed operands
    /// from the segment's first token, or the gathered buffer `n` of a
    /// segment with context.
    source: Source,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Packed(usize),
    Gathered(usize),
}

impl Item {
    fn rows(&self) -> usize {
        self.pad + self.queries.1 - self.queries.0
    }

    fn keys(&self) -> usize {
        self.first_query + self.rows() - self.first_key
    }
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
    /// The work items; segments with context take their keys from gathered
    /// buffers, numbered in segment order.
    fn items(&self) -> Vec<Item> {
        let block = self.query_block.max(1);
        let mut items = Vec::new();
        let mut gathered = 0;
        for seg in &self.segments {
            let (tokens, context) = (&seg.tokens, &seg.context);
            let source = if context.is_empty() {
                Source::Packed(tokens.start)
            } else {
                gathered += 1;
                Source::Gathered(gathered - 1)
            };
            // Blocks end at multiples of `block` in positions, as a sequence
            // packed whole would have them.
            let mut q0 = tokens.start;
            while q0 < tokens.end {
                let at = context.len() + (q0 - tokens.start);
                let pad = at % block;
                let q1 = (q0 + block - pad).min(tokens.end);
                // Only a first block with context can start inside a block.
                let pad = if q0 == tokens.start { pad } else { 0 };
                let first_query = at - pad;
                let first_key = first_visible_key(first_query, self.window, 0);
                for head in 0..self.heads {
                    items.push(Item {
                        head,
                        queries: (q0, q1),
                        pad,
                        context_end: context.end,
                        first_query,
                        first_key,
                        source,
                    });
                }
                q0 = q1;
            }
        }
        // The largest items first, so that the last ones to run are short.
        items.sort_by_key(|it| std::cmp::Reverse(it.keys()));
        items
    }

    /// For every segment with context, its keys and values from position 0
    /// (the context's, then its own) in one buffer each, laid out as k and v.
    fn gather(&self, k: &[f32], v: &[f32]) -> Vec<(Vec<f32>, Vec<f32>)> {
        let row = self.kv_heads * self.head_dim;
        let with_context: Vec<&Segment> =
            self.segments.iter().filter(|s| !s.context.is_empty()).collect();
        with_context
            .par_iter()
            .map(|seg| {
                let copy = |x: &[f32]| {
                    let mut buf = Vec::with_capacity((seg.context.len() + seg.tokens.len()) * row);
                    buf.extend_from_slice(&x[seg.context.start * row..seg.context.end * row]);
                    buf.extend_from_slice(&x[seg.tokens.start * row..seg.tokens.end * row]);
                    buf
                };
                (copy(k), copy(v))
            })
            .collect()
    }

    fn check(&self, tokens: usize) -> candle_core::Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!("attention: {} heads do not share {} kv heads evenly", self.heads, self.kv_heads);
        }
        let mut next = 0;
        for Segment { tokens: s, context: c } in &self.segments {
            if s.start != next || s.end <= s.start {
                bail!("attention: segment {s:?} does not follow token {next} or is empty");
            }
            next = s.end;
            let overlaps = c.start < s.end && s.start < c.end;
            if !c.is_empty() && (c.end > tokens || overlaps) {
                bail!("attention: segment {s:?} has context {c:?}, outside the batch or over it");
            }
        }
        if next != tokens {
            bail!("attention: the segments cover {next} tokens, the batch has {tokens}");
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
        let gathered = self.gather(k, v);
        let block = self.query_block.max(1);
        items.par_iter().for_each_init(
            || (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new()),
            |(scores, probs, padded_q, padded_out), item| {
                let (q0, q1) = item.queries;
                let (rows, keys) = (item.rows(), item.keys());
                // A block of fewer rows runs as a whole block (zero queries
                // after its rows, their results dropped): the matmuls then
                // have the same shape wherever a position's block ends, and
                // give the same bits (gemm picks other kernels for few rows).
                let m = rows.max(block);
                let scratch = item.pad > 0 || m > rows;
                let kvh = item.head / groups;
                // The matmul writes every score; the probabilities of keys a
                // row cannot see must be 0.
                scores.resize(m * keys, 0.0);
                probs.clear();
                probs.resize(m * keys, 0.0);
                // Position 0 of the segment's keys and values.
                let (k0, v0) = match item.source {
                    Source::Packed(t) => (&k[t * nkv * hd..], &v[t * nkv * hd..]),
                    Source::Gathered(g) => (&gathered[g].0[..], &gathered[g].1[..]),
                };
                let kv_offset = (item.first_key * nkv + kvh) * hd;
                // The query rows (pointer, row stride): in q, or this head's
                // columns of the padding rows, its own and zero rows.
                let (q_rows, q_stride) = if scratch {
                    padded_q.clear();
                    let pad_rows = item.context_end - item.pad..item.context_end;
                    for t in pad_rows.chain(q0..q1) {
                        let at = (t * nh + item.head) * hd;
                        padded_q.extend_from_slice(&q[at..at + hd]);
                    }
                    padded_q.resize(m * hd, 0.0);
                    padded_out.clear();
                    padded_out.resize(m * hd, 0.0);
                    (padded_q.as_ptr(), hd)
                } else {
                    (q[(q0 * nh + item.head) * hd..].as_ptr(), nh * hd)
                };
                // 1. scores = Q K^T: Q rows of stride nh·hd; K^T (hd × keys)
                // has column j at key j (stride nkv·hd) and row d at dim d.
                // SAFETY: every index read is within the m query rows and k0
                // (key positions first_key.. up to the last query, of this
                // head's columns), and `scores` holds m × keys.
                unsafe {
                    matmul(
                        (m, keys, hd),
                        (scores.as_mut_ptr(), keys),
                        (q_rows, q_stride),
                        (k0.as_ptr().add(kv_offset), 1, nkv * hd),
                    );
                }
                // 2. the softmax of each row over its visible keys (column c
                // is the key at position first_key + c).
                for (r, (srow, prow)) in scores
                    .chunks_exact_mut(keys)
                    .zip(probs.chunks_exact_mut(keys))
                    .take(rows)
                    .enumerate()
                {
                    let i = item.first_query + r;
                    let first = first_visible_key(i, self.window, item.first_key);
                    let (lo, hi) = (first - item.first_key, i + 1 - item.first_key);
                    softmax_row(&mut srow[lo..hi], &mut prow[lo..hi], self.scale, softcap);
                }
                // 3. out rows q0..q1, this head's columns = P V (with
                // padding rows into a scratch buffer, then its own rows out).
                // SAFETY: the V rows read are the item's key positions of this
                // kv head, within v0; the output rows q0..q1 × columns
                // head·hd..(head+1)·hd are within `out` and written by this
                // item only; `padded_out` holds m × hd.
                unsafe {
                    let base = out_ptr;
                    let out = base.0.add(q0 * nh * hd + item.head * hd);
                    let (dst, dst_stride) =
                        if scratch { (padded_out.as_mut_ptr(), hd) } else { (out, nh * hd) };
                    matmul(
                        (m, hd, keys),
                        (dst, dst_stride),
                        (probs.as_ptr(), keys),
                        (v0.as_ptr().add(kv_offset), nkv * hd, 1),
                    );
                    if scratch {
                        let own = padded_out.chunks_exact(hd).take(rows).skip(item.pad);
                        for (r, row) in own.enumerate() {
                            std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * nh * hd), hd);
                        }
                    }
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
mod tests;
