//! The CPU reference sampler: O(V + k) per row, no sort of the vocabulary.
//!
//! For a row z with max m and temperature T (inverse `inv_t` = 1/T in f64):
//!
//! 1. e_i = exp(((z_i − m) · inv_t) as f32), an f32 exponential; -inf logits give 0.
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
//!    running f64 sum of the block's e_i. Thresholds that rounding leaves past the
//!    end go to the last id with e_i > 0.
//!
//! Everything the CUDA kernel must reproduce is in this description; the kernel
//! may sum in another order, so it agrees except where a threshold lies within
//! rounding of a CDF boundary.

use super::{Method, RowKey, SampledRows, SamplerError, SamplingParams, philox::philox4x32_10};

/// NaN or +inf: the logit values the contract rejects (-inf is a masked id).
#[inline(always)]
fn is_nan_or_pos_inf(v: f32) -> bool {
    v.is_nan() || v == f32::INFINITY
}

/// Ids per block of the CDF walk.
pub const BLOCK: usize = 256;

/// The reference sampler. Holds scratch buffers, so one instance per thread
/// samples any number of rows without allocating.
#[derive(Debug, Default)]
pub struct CpuSampler {
    exps: Vec<f32>,
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
        if vocab == 0 {
            return Err(SamplerError::EmptyRow);
        }
        if logits.len() != keys.len() * vocab {
            return Err(SamplerError::ShapeMismatch { len: logits.len(), rows: keys.len(), vocab });
        }
        for (row, key) in logits.chunks_exact(vocab).zip(keys) {
            self.sample_row(row, params, *key, out)?;
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
        let stats = self.softmax_pass(logits, params.temperature())?;
        match params.method() {
            Method::Sample => self.walk(logits, &stats, params.num_samples(), key, out),
            Method::TopK => self.top_k(logits, &stats, params.num_samples(), out),
        }
        out.finish_row(stats.lse());
        Ok(())
    }

    /// Passes 1 and 2: the max (rejecting NaN and +inf), the e_i and the block sums.
    fn softmax_pass(&mut self, z: &[f32], temperature: f32) -> Result<RowStats, SamplerError> {
        if z.is_empty() {
            return Err(SamplerError::EmptyRow);
        }
        let mut max = f32::NEG_INFINITY;
        let mut bad = false;
        for &v in z {
            bad |= is_nan_or_pos_inf(v);
            max = if v > max { v } else { max };
        }
        if bad {
            let index = z.iter().position(|&v| is_nan_or_pos_inf(v)).expect("a bad value was seen");
            return Err(SamplerError::NonFiniteLogit { index, value: z[index] });
        }
        if max == f32::NEG_INFINITY {
            return Err(SamplerError::AllMasked);
        }
        let inv_t = 1.0 / f64::from(temperature);
        let m = f64::from(max);
        self.exps.resize(z.len(), 0.0);
        self.block_sums.clear();
        let mut total = 0.0f64;
        for (zb, eb) in z.chunks(BLOCK).zip(self.exps.chunks_mut(BLOCK)) {
            let mut block = 0.0f64;
            for (&zi, ei) in zb.iter().zip(eb.iter_mut()) {
                let e = (((f64::from(zi) - m) * inv_t) as f32).exp();
                *ei = e;
                block += f64::from(e);
            }
            self.block_sums.push(block);
            total += block;
        }
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
            let mut local = 0.0f64;
            for (i, &e) in self.exps[start..(start + BLOCK).min(z.len())].iter().enumerate() {
                if e == 0.0 {
                    continue;
                }
                local += f64::from(e);
                let first = j;
                while j < t.len() && t[j] - before < local {
                    j += 1;
                }
                if j > first {
                    let id = start + i;
                    out.push_entry(id as u32, (j - first) as u32, stats.logprob(z[id]));
                }
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
        self.order.sort_unstable();
        for &id in &self.order {
            out.push_entry(id, 1, stats.logprob(z[id as usize]));
        }
    }
}
