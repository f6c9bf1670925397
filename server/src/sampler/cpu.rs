//! The CPU reference sampler: O(V + k) per row, no sort of the vocabulary.
//!
//! For a row z with max m and temperature T (inverse `inv_t` = 1/T in f64):
//!
//! 1. e_i = exp_f32(((z_i − m) · inv_t) as f32) ([`crate::kernels::exp_f32`]), glibc's f32 exponential;
//!    -inf logits give 0. (At T = 1 the argument is the f32 difference z_i − m,
//!    which is the same number.)
//! 2. The vocabulary is cut into blocks of [`BLOCK`] ids. B_b, the sum of a block's
//!    e_i, is accumulated sequentially in f64; S = Σ_b B_b, sequentially, and
//!    log p_i = (z_i − m) · inv_t − ln S, lse = m · inv_t + ln S.
//! 3. k sorted uniforms come from k + 1 exponentials: E_j = −ln((x_j + ½) / 2³²)
//!    where x_j is Philox word j of the row's stream, G_j = E_0 + … + E_j, and
//!    threshold t_j = G_j · S / G_k (j < k) — the order statistics of k uniforms
//!    on [0, S), generated already sorted.
//! 4. One walk over the blocks: with A the sum of the blocks before block b, the
//!    block is skipped when t_j − A ≥ B_b for the next threshold t_j; inside it,
//!    id i takes every threshold with L_{i−1} ≤ t_j − A < L_i, where L is the
//!    running f64 sum of the block's e_i (a t_j − A below 0, left by the rounding
//!    of A, goes to the block's first id with e_i > 0). Thresholds that rounding
//!    leaves past the end go to the last id with e_i > 0.
//!
//! Everything the CUDA kernel must reproduce is in this description; the kernel
//! may sum in another order, so it agrees except where a threshold lies within
//! rounding of a CDF boundary.
//!
//! How it runs fast: where the CPU has AVX2 and FMA (chosen at run time), the
//! exponentials run four at a time (the same operations as the scalar
//! [`exp_f32`](crate::kernels::exp_f32) (in `crate::kernels`), fused multiply-adds included, so the same bits) and the max is
//! a loop compiled for AVX2; where it also has AVX-512F, eight at a time in
//! f64 lanes (still the same operations, so the same bits). (Elsewhere `f64::mul_add` is exact too, but on an
//! x86-64 CPU without FMA it is a call to the C library's `fma`, which is
//! slow.) The sequential sums of [`GROUP`]
//! blocks are accumulated side by side (independent chains, each still
//! sequential), and their running values L are kept at the end of every
//! [`SPAN`] ids only: the walk finds a threshold's span by binary search and
//! sums again within that one span, in the same order, so the same L. (Keeping
//! every L wrote 8 bytes per id, twice the row itself; the marks made the row
//! 1.1–1.4× faster.) Rows are
//! independent, so [`CpuSampler::sample_rows`] splits a large batch of rows
//! over threads; the result is the same.

use super::{
    Method, NO_TOKEN, RowKey, RowQueries, SampledRows, SamplerError, SamplingParams,
    philox::philox4x32_10,
};
#[cfg(target_arch = "x86_64")]
use crate::kernels::exp::{exps_avx2, exps_avx512};
use crate::kernels::{avx2_fma, avx512, exp::exps};

/// NaN or +inf: the logit values the contract rejects (-inf is a masked id).
#[inline(always)]
fn is_nan_or_pos_inf(v: f32) -> bool {
    v.is_nan() || v == f32::INFINITY
}

/// Ids per block of the CDF walk.
pub const BLOCK: usize = 256;

/// Blocks whose sequential sums are accumulated side by side.
const GROUP: usize = 8;

/// Ids per span: the running sum L is kept at the end of every span of a block
/// (not at every id), so the walk jumps whole spans and sums at most one again.
const SPAN: usize = 16;

/// Spans per block.
const SPANS: usize = BLOCK / SPAN;

/// Logits (rows × V) below which [`CpuSampler::sample_rows`] stays on one
/// thread: starting threads costs more than such a batch.
const PARALLEL_MIN_LOGITS: usize = 1 << 20;

/// The max of a row, and whether it holds NaN or +inf.
#[inline(always)]
fn max_and_bad(z: &[f32]) -> (f32, bool) {
    const LANES: usize = 16;
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut bad = [false; LANES];
    let chunks = z.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l];
            bad[l] |= is_nan_or_pos_inf(v);
            max[l] = if v > max[l] { v } else { max[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    let mut any_bad = false;
    for &v in rest.iter().chain(max.iter()) {
        any_bad |= is_nan_or_pos_inf(v);
        m = if v > m { v } else { m };
    }
    (m, any_bad || bad.iter().any(|&b| b))
}

/// Step 2: the block sums B_b, and each block's running sum L at the end of
/// every span (`marks[b · SPANS + s]`, the last one of a block is B_b).
#[inline(always)]
fn block_sums(exps: &[f32], marks: &mut [f64], block_sums: &mut Vec<f64>) {
    let n = exps.len();
    let full_groups = n / (BLOCK * GROUP);
    for (eg, mg) in exps
        .chunks_exact(BLOCK * GROUP)
        .zip(marks.chunks_exact_mut(SPANS * GROUP))
        .take(full_groups)
    {
        // GROUP independent sequential sums, one per block.
        let mut acc = [0.0f64; GROUP];
        for s in 0..SPANS {
            for i in s * SPAN..(s + 1) * SPAN {
                for (g, a) in acc.iter_mut().enumerate() {
                    *a += f64::from(eg[g * BLOCK + i]);
                }
            }
            for (g, a) in acc.iter().enumerate() {
                mg[g * SPANS + s] = *a;
            }
        }
        block_sums.extend_from_slice(&acc);
    }
    let done = full_groups * BLOCK * GROUP;
    let marks = &mut marks[full_groups * GROUP * SPANS..];
    for (eb, mb) in exps[done..].chunks(BLOCK).zip(marks.chunks_mut(SPANS)) {
        let mut acc = 0.0f64;
        for (es, m) in eb.chunks(SPAN).zip(mb.iter_mut()) {
            for &e in es {
                acc += f64::from(e);
            }
            *m = acc;
        }
        block_sums.push(acc);
    }
}

/// [`max_and_bad`] with AVX2: the same 16 lanes (two vectors of 8), each
/// keeping `if v > max { v } else { max }` (`vmaxps` with v first), reduced in
/// the same order, so the same result, the sign of a zero max included.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn max_and_bad_avx2(z: &[f32]) -> (f32, bool) {
    use std::arch::x86_64::*;
    const LANES: usize = 16;
    let whole = z.len() - z.len() % LANES;
    let inf = _mm256_set1_ps(f32::INFINITY);
    let (mut m0, mut m1) = (_mm256_set1_ps(f32::NEG_INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
    let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..whole).step_by(LANES) {
        // SAFETY: i + 16 <= z.len().
        let (v0, v1) =
            unsafe { (_mm256_loadu_ps(z.as_ptr().add(i)), _mm256_loadu_ps(z.as_ptr().add(i + 8))) };
        // NaN or +inf: not below +inf (unordered compares true).
        b0 = _mm256_or_ps(b0, _mm256_cmp_ps::<_CMP_NLT_UQ>(v0, inf));
        b1 = _mm256_or_ps(b1, _mm256_cmp_ps::<_CMP_NLT_UQ>(v1, inf));
        m0 = _mm256_max_ps(v0, m0);
        m1 = _mm256_max_ps(v1, m1);
    }
    let mut max = [0.0f32; LANES];
    // SAFETY: `max` holds 16 f32s.
    unsafe {
        _mm256_storeu_ps(max.as_mut_ptr(), m0);
        _mm256_storeu_ps(max.as_mut_ptr().add(8), m1);
    }
    let bad = _mm256_movemask_ps(_mm256_or_ps(b0, b1)) != 0;
    let mut m = f32::NEG_INFINITY;
    let mut any_bad = bad;
    for &v in z[whole..].iter().chain(max.iter()) {
        any_bad |= is_nan_or_pos_inf(v);
        m = if v > m { v } else { m };
    }
    (m, any_bad)
}

/// [`exps`] with [`exps_avx2`] and [`block_sums`], compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exps_and_sums_avx2(
    z: &[f32],
    max: f32,
    inv_t: f64,
    e: &mut [f32],
    marks: &mut [f64],
    sums: &mut Vec<f64>,
) {
    exps_avx2(z, max, inv_t, e);
    block_sums(e, marks, sums);
}

/// [`exps`] with [`exps_avx512`] and [`block_sums`], compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exps_and_sums_avx512(
    z: &[f32],
    max: f32,
    inv_t: f64,
    e: &mut [f32],
    marks: &mut [f64],
    sums: &mut Vec<f64>,
) {
    exps_avx512(z, max, inv_t, e);
    block_sums(e, marks, sums);
}

/// [`max_and_bad`], in its AVX2 build where the CPU has AVX2 and FMA.
fn max_and_bad_fastest(z: &[f32]) -> (f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just now).
        return unsafe { max_and_bad_avx2(z) };
    }
    max_and_bad(z)
}

/// Steps 1 and 2 ([`exps`], [`block_sums`]), in the AVX-512 build where the CPU
/// has AVX-512F, else in the AVX2 + FMA build where it has both.
fn exps_and_sums_fastest(
    z: &[f32],
    max: f32,
    inv_t: f64,
    e: &mut [f32],
    marks: &mut [f64],
    sums: &mut Vec<f64>,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked just now).
        return unsafe { exps_and_sums_avx512(z, max, inv_t, e, marks, sums) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just now).
        return unsafe { exps_and_sums_avx2(z, max, inv_t, e, marks, sums) };
    }
    exps(z, max, inv_t, e);
    block_sums(e, marks, sums);
}

/// The reference sampler. Holds scratch buffers, so one instance samples any
/// number of rows without allocating; [`sample_rows`](Self::sample_rows) uses
/// as many threads as candle does (`RAYON_NUM_THREADS`, else one per core) for
/// large batches.
#[derive(Debug, Default)]
pub struct CpuSampler {
    main: Scratch,
    /// Scratch of the helper threads.
    workers: Vec<Scratch>,
}

/// One thread's scratch buffers, and the per-row algorithm.
#[derive(Debug, Default)]
struct Scratch {
    exps: Vec<f32>,
    /// Within each block, the running f64 sum L of its e_i at the end of every
    /// span (see [`block_sums`]).
    marks: Vec<f64>,
    block_sums: Vec<f64>,
    thresholds: Vec<f64>,
    order: Vec<u32>,
}

/// What pass 1 and 2 learn about a row.
struct RowStats {
    max: f32,
    inv_t: f64,
    /// S, the sum of the e_i.
    total: f64,
    ln_sum: f64,
}

impl RowStats {
    #[inline]
    fn logprob(&self, z: f32) -> f32 {
        ((f64::from(z) - f64::from(self.max)) * self.inv_t - self.ln_sum) as f32
    }

    fn lse(&self) -> f32 {
        (f64::from(self.max) * self.inv_t + self.ln_sum) as f32
    }
}

impl CpuSampler {
    /// A sampler with empty scratch buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples `keys.len()` rows of `vocab` logits each, stored row-major in
    /// `logits`, appending them to `out`. On error `out` keeps the rows before
    /// the failing one.
    pub fn sample_rows(
        &mut self,
        logits: &[f32],
        vocab: usize,
        params: &SamplingParams,
        keys: &[RowKey],
        out: &mut SampledRows,
    ) -> Result<(), SamplerError> {
        self.sample_rows_scored(logits, vocab, params, keys, RowQueries::NONE, out)
    }

    /// [`sample_rows`](Self::sample_rows), also scoring what `queries` ask of
    /// each row (realised tokens and candidates) in the same pass.
    pub fn sample_rows_scored(
        &mut self,
        logits: &[f32],
        vocab: usize,
        params: &SamplingParams,
        keys: &[RowKey],
        queries: RowQueries<'_>,
        out: &mut SampledRows,
    ) -> Result<(), SamplerError> {
        let threads = if logits.len() >= PARALLEL_MIN_LOGITS {
            candle_core::utils::get_num_threads()
        } else {
            1
        };
        self.sample_rows_on(threads, logits, vocab, params, keys, queries, out)
    }

    /// [`sample_rows_scored`](Self::sample_rows_scored) on at most `threads` threads.
    #[allow(clippy::too_many_arguments)]
    fn sample_rows_on(
        &mut self,
        threads: usize,
        logits: &[f32],
        vocab: usize,
        params: &SamplingParams,
        keys: &[RowKey],
        queries: RowQueries<'_>,
        out: &mut SampledRows,
    ) -> Result<(), SamplerError> {
        if vocab == 0 {
            return Err(SamplerError::EmptyRow);
        }
        if logits.len() != keys.len() * vocab {
            return Err(SamplerError::ShapeMismatch { len: logits.len(), rows: keys.len(), vocab });
        }
        queries.check(keys.len(), vocab)?;
        let threads = threads.clamp(1, keys.len().max(1));
        if threads == 1 {
            for (r, (row, key)) in logits.chunks_exact(vocab).zip(keys).enumerate() {
                self.main.sample_row(row, params, *key, queries.row(r), out)?;
            }
            return Ok(());
        }
        // Contiguous runs of rows, one per thread; this thread takes the first.
        let per = keys.len().div_ceil(threads);
        self.workers.resize_with(threads - 1, Scratch::default);
        let (main, workers) = (&mut self.main, &mut self.workers);
        let mut runs = logits
            .chunks(per * vocab)
            .zip(keys.chunks(per))
            .enumerate()
            .map(|(i, (l, k))| (l, k, queries.rows(i * per..i * per + k.len())));
        let (first_logits, first_keys, first_queries) = runs.next().expect("at least one row");
        let run = |scratch: &mut Scratch, logits: &[f32], keys: &[RowKey], q: RowQueries<'_>| {
            let mut part = SampledRows::new();
            let result =
                logits.chunks_exact(vocab).zip(keys).enumerate().try_for_each(|(r, (row, key))| {
                    scratch.sample_row(row, params, *key, q.row(r), &mut part)
                });
            (part, result)
        };
        let run = &run;
        let parts: Vec<(SampledRows, Result<(), SamplerError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = workers
                .iter_mut()
                .zip(runs)
                .map(|(scratch, (l, k, q))| s.spawn(move || run(scratch, l, k, q)))
                .collect();
            let mut parts = vec![run(main, first_logits, first_keys, first_queries)];
            for h in handles {
                parts.push(h.join().expect("a sampler thread panicked: this is a bug"));
            }
            parts
        });
        for (part, result) in parts {
            out.append(&part);
            result?;
        }
        Ok(())
    }

    /// Samples one row of logits and appends it to `out`.
    pub fn sample_row(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        key: RowKey,
        out: &mut SampledRows,
    ) -> Result<(), SamplerError> {
        self.main.sample_row(logits, params, key, (None, &[]), out)
    }
}

/// One row's queries: the realised token (None: not asked; `Some(NO_TOKEN)`:
/// the row has none) and the candidate ids.
type RowQuery<'a> = (Option<u32>, &'a [u32]);

impl Scratch {
    fn sample_row(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        key: RowKey,
        query: RowQuery<'_>,
        out: &mut SampledRows,
    ) -> Result<(), SamplerError> {
        // The ids were checked against the vocabulary with the rows' shape
        // (`RowQueries::check`, in `sample_rows_on`).
        let stats = self.softmax_pass(logits, params.temperature())?;
        match params.method() {
            Method::Sample => self.walk(logits, &stats, params.num_samples(), key, out),
            Method::TopK => self.top_k(logits, &stats, params.num_samples(), out),
            Method::None => {}
        }
        score_row(logits, &stats, query, out);
        out.finish_row(stats.lse());
        Ok(())
    }

    /// Passes 1 and 2: the max (rejecting NaN and +inf), the e_i and the block sums.
    fn softmax_pass(&mut self, z: &[f32], temperature: f32) -> Result<RowStats, SamplerError> {
        if z.is_empty() {
            return Err(SamplerError::EmptyRow);
        }
        let (max, bad) = max_and_bad_fastest(z);
        if bad {
            let index = z.iter().position(|&v| is_nan_or_pos_inf(v)).expect("a bad value was seen");
            return Err(SamplerError::NonFiniteLogit { index, value: z[index] });
        }
        if max == f32::NEG_INFINITY {
            return Err(SamplerError::AllMasked);
        }
        let inv_t = 1.0 / f64::from(temperature);
        self.exps.resize(z.len(), 0.0);
        self.marks.resize(z.len().div_ceil(BLOCK) * SPANS, 0.0);
        self.block_sums.clear();
        exps_and_sums_fastest(z, max, inv_t, &mut self.exps, &mut self.marks, &mut self.block_sums);
        let total = self.block_sums.iter().fold(0.0f64, |s, &b| s + b);
        // e = 1 at the max, so total >= 1 and its log is finite.
        Ok(RowStats { max, inv_t, total, ln_sum: total.ln() })
    }

    /// The k sorted thresholds on [0, S) of the row's stream (step 3).
    fn fill_thresholds(&mut self, key: RowKey, k: u32, total: f64) {
        let k = k as usize;
        self.thresholds.clear();
        let pkey = key.philox_key();
        let mut g = 0.0f64;
        let mut words = [0u32; 4];
        for j in 0..=k {
            if j % 4 == 0 {
                words = philox4x32_10(key.counter((j / 4) as u32), pkey);
            }
            let u = (f64::from(words[j % 4]) + 0.5) * (1.0 / 4_294_967_296.0);
            g += -u.ln();
            self.thresholds.push(g);
        }
        let scale = total / g;
        self.thresholds.truncate(k);
        for t in &mut self.thresholds {
            *t *= scale;
        }
    }

    /// Step 4: the CDF walk of sample mode.
    fn walk(&mut self, z: &[f32], stats: &RowStats, k: u32, key: RowKey, out: &mut SampledRows) {
        self.fill_thresholds(key, k, stats.total);
        let t = &self.thresholds;
        let mut j = 0usize;
        let mut before = 0.0f64;
        let mut last_positive = None;
        for (b, &block) in self.block_sums.iter().enumerate() {
            if j == t.len() {
                break;
            }
            if block > 0.0 {
                last_positive = Some(b);
            }
            if t[j] - before >= block {
                before += block;
                continue;
            }
            let start = b * BLOCK;
            let es = &self.exps[start..(start + BLOCK).min(z.len())];
            let marks = &self.marks[b * SPANS..b * SPANS + es.len().div_ceil(SPAN)];
            // i: the next id that can be drawn; l: L_{i−1}, the running sum before it.
            let (mut i, mut l) = (0usize, 0.0f64);
            while j < t.len() {
                let x = t[j] - before;
                if x >= block {
                    break;
                }
                // The id i with L_{i−1} ≤ x < L_i (then e_i > 0); below 0, the
                // first id with e_i > 0, the first with L_i > 0. Spans whose
                // last L is ≤ x are jumped; x < B_b, the last mark, so one is left.
                let x = if x < 0.0 { 0.0 } else { x };
                let span = i / SPAN;
                if marks[span] <= x {
                    let s = span + 1 + marks[span + 1..].partition_point(|&m| m <= x);
                    (i, l) = (s * SPAN, marks[s - 1]);
                }
                // The same sequential sum as [`block_sums`], so the same L_i.
                l += f64::from(es[i]);
                while l <= x {
                    i += 1;
                    l += f64::from(es[i]);
                }
                let first = j;
                j += 1;
                while j < t.len() && t[j] - before < l {
                    j += 1;
                }
                let id = start + i;
                out.push_entry(id as u32, (j - first) as u32, stats.logprob(z[id]));
                i += 1;
            }
            before += block;
        }
        if j < t.len() {
            // Rounding left thresholds at or past S: they belong to the last id
            // with positive probability.
            let b = last_positive.expect("the max logit has e = 1: this is a bug");
            let start = b * BLOCK;
            let end = (start + BLOCK).min(z.len());
            let id = (start..end).rev().find(|&i| self.exps[i] > 0.0).expect("block sum > 0");
            let extra = (t.len() - j) as u32;
            let row_start = *out.offsets.last().expect("offsets starts with 0") as usize;
            if out.token_ids.len() > row_start && *out.token_ids.last().unwrap() == id as u32 {
                *out.counts.last_mut().unwrap() += extra;
            } else {
                out.push_entry(id as u32, extra, stats.logprob(z[id]));
            }
        }
    }

    /// Top-k mode: the k largest logits (ties to the lower id), ascending ids.
    /// Ids whose logit is -inf have probability 0 and are never returned.
    fn top_k(&mut self, z: &[f32], stats: &RowStats, k: u32, out: &mut SampledRows) {
        self.order.clear();
        self.order.extend((0..z.len() as u32).filter(|&i| z[i as usize] > f32::NEG_INFINITY));
        let k = (k as usize).min(self.order.len());
        let larger_first =
            |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then_with(|| a.cmp(b));
        if k < self.order.len() {
            self.order.select_nth_unstable_by(k - 1, larger_first);
            self.order.truncate(k);
        }
        // By descending log-probability, ties by ascending id (the protocol's
        // top-k order): the logprob is a monotone function of z, so this is
        // the order of z except where two logits round to one logprob.
        let row_start = out.token_ids.len();
        for &id in &self.order {
            out.push_entry(id, 1, stats.logprob(z[id as usize]));
        }
        out.order_entries_by_logprob(row_start..out.token_ids.len());
    }
}

/// Appends what `query` asks of the row `z` (whose softmax is `stats`): the
/// realised token's log p and rank, and the candidates' log p (closed with
/// the row by [`SampledRows::finish_row`]).
fn score_row(z: &[f32], stats: &RowStats, query: RowQuery<'_>, out: &mut SampledRows) {
    let (realised, candidates) = query;
    match realised {
        Some(NO_TOKEN) => {
            out.token_logprobs.push(f32::NAN);
            out.token_ranks.push(0);
        }
        Some(id) => {
            let zx = z[id as usize];
            out.token_logprobs.push(stats.logprob(zx));
            out.token_ranks.push(rank(z, zx));
        }
        None => {}
    }
    out.candidate_logprobs.extend(candidates.iter().map(|&id| stats.logprob(z[id as usize])));
}

/// 1 + the number of logits larger than `zx` (vLLM's rank).
fn rank(z: &[f32], zx: f32) -> u32 {
    // Counted in lanes of 8 so that the compiler vectorises the compare.
    let mut lanes = [0u32; 8];
    let chunks = z.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += u32::from(v > zx);
        }
    }
    let larger = lanes.iter().sum::<u32>() + tail.iter().map(|&v| u32::from(v > zx)).sum::<u32>();
    1 + larger
}

#[cfg(test)]
mod tests;
