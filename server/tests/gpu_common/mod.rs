//! The GPU sampler tests' inputs and how they judge a comparison, shared by
//! `gpu_sampler.rs` (the kernel against the CPU reference; `cuda` feature, on a
//! GPU) and `gpu_cases.rs` (these inputs and judgements checked on the CPU, in
//! every build, so that a GPU run never finds a broken case first).

#![allow(dead_code)]

use candle_core::DType;
use logitd::sampler::{Method, RowKey, SampledRows, SamplingParams};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// Rows of random logits of several kinds: teacher-like (a Zipf-shaped head
/// over noise), flat (near-uniform: the hardest case, every id has mass), and
/// teacher-like with about 10% of ids masked to -inf (every fourth row).
///
/// Every row keeps at least one finite logit: the masking never touches id
/// `r % vocab` of row r (it still draws for it, so every other value is what it
/// was before that rule). Without the rule a masked row of a tiny vocabulary is
/// sometimes entirely -inf (row 35 at V = 1, seed 10), which both the kernel
/// and the reference refuse; that case is made on purpose by
/// [`all_masked_logits`].
pub fn random_logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut z = vec![0f32; rows * vocab];
    for (r, row) in z.chunks_exact_mut(vocab).enumerate() {
        let kind = r % 4;
        let keep = r % vocab;
        let scale: f32 = rng.random_range(0.5..3.0);
        for (i, v) in row.iter_mut().enumerate() {
            let g = gaussian(&mut rng);
            *v = match kind {
                0 | 3 => {
                    // A random id order with a Zipf-like head.
                    let rank = (i.wrapping_mul(2_654_435_761) ^ r) % vocab;
                    -1.1 * ((rank + 1) as f32).ln() * scale + g
                }
                1 => 0.05 * g,
                _ => 4.0 * scale * g,
            };
            let masked = kind == 3 && rng.random_range(0..10) == 0;
            if masked && i != keep {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    z
}

pub fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

pub fn keys(rows: usize, seed: u64) -> Vec<RowKey> {
    (0..rows as u32).map(|p| RowKey { seed, sequence: p % 7, position: p }).collect()
}

/// The vocabularies of the ragged-rows case: odd sizes (no vector loads,
/// partial tiles), k > V.
pub const RAGGED_VOCABS: [usize; 7] = [1, 2, 7, 255, 257, 1001, 4099];
/// Rows of each ragged case.
pub const RAGGED_ROWS: usize = 64;
/// The dtypes each ragged case is sampled in.
pub const RAGGED_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// What each ragged case samples: sample mode, top-k with ties, top-k with k > V.
pub fn ragged_params() -> [SamplingParams; 3] {
    [
        SamplingParams::new(Method::Sample, 300, 1.0).unwrap(),
        SamplingParams::new(Method::TopK, 5, 1.0).unwrap(),
        SamplingParams::new(Method::TopK, 5000, 1.0).unwrap(),
    ]
}

/// The ragged-rows case at `vocab`: [`random_logits`] with every third value
/// rounded to a multiple of 0.5 (many equal logits: ties for top-k).
pub fn ragged_logits(vocab: usize) -> Vec<f32> {
    let mut z = random_logits(RAGGED_ROWS, vocab, 9 + vocab as u64);
    for (i, v) in z.iter_mut().enumerate() {
        if i % 3 == 0 && v.is_finite() {
            *v = (*v * 2.0).round() * 0.5; // many equal logits
        }
    }
    z
}

/// The row that [`all_masked_logits`] masks entirely (a masked-kind row, the
/// one that came out all -inf at V = 1 before [`random_logits`] kept an id).
pub const ALL_MASKED_ROW: usize = 35;

/// The ragged case at `vocab` with row [`ALL_MASKED_ROW`] entirely -inf: the
/// kernel and the reference must both fail with `AllMasked` and keep the rows
/// before it.
pub fn all_masked_logits(vocab: usize) -> Vec<f32> {
    let mut z = ragged_logits(vocab);
    z[ALL_MASKED_ROW * vocab..(ALL_MASKED_ROW + 1) * vocab].fill(f32::NEG_INFINITY);
    z
}

/// f32 ulps between a and b (both finite).
pub fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let b = x.to_bits() as i64;
        if b < 0x8000_0000 { b } else { 0x8000_0000 - b }
    };
    (key(a) - key(b)).unsigned_abs() as u32
}

/// Differing rows described per case (the rest are only counted), so that a
/// broken kernel's log stays small: at 512 rows × k = 4,096 every row printed
/// in full was ~58 MB.
pub const SHOWN_ROWS: usize = 5;

#[derive(Debug, Default)]
pub struct Agreement {
    pub rows: usize,
    pub identical: usize,
    pub boundary: usize,
    pub other: usize,
    pub logprob_ulps: u32,
    pub lse_ulps: u32,
    /// The first [`SHOWN_ROWS`] rows that differ beyond a boundary, described
    /// by counts only (no ids: the logs carry no token ids).
    pub shown: Vec<String>,
}

impl Agreement {
    pub fn fraction(&self) -> f64 {
        self.identical as f64 / self.rows as f64
    }

    /// Sample-mode rows that may differ at a CDF boundary: one in a thousand,
    /// and at least one (a single moved draw at 16 or 48 rows is not a fault).
    pub fn boundary_allowance(&self) -> usize {
        (self.rows / 1000).max(1)
    }

    /// Sample mode's rule: every differing row is a draw moved across a CDF
    /// boundary, and there are at most [`Self::boundary_allowance`] of them.
    pub fn sample_ok(&self) -> bool {
        self.other == 0 && self.boundary <= self.boundary_allowance()
    }

    /// The AGREEMENT line (tests/gpu/run.sh makes it a JSON record), then the
    /// rows shown and how many more differ.
    pub fn print(&self, what: &str) {
        print!("{}", self.text(what));
    }

    pub fn text(&self, what: &str) -> String {
        let mut s = format!(
            "AGREEMENT {what} rows={} identical={} boundary={} other={} fraction={:.6} \
             max_logprob_ulps={} max_lse_ulps={}\n",
            self.rows,
            self.identical,
            self.boundary,
            self.other,
            self.fraction(),
            self.logprob_ulps,
            self.lse_ulps
        );
        for line in &self.shown {
            s += &format!("DIFFER {what}: {line}\n");
        }
        if self.other > self.shown.len() {
            s += &format!(
                "DIFFER {what}: {} rows differ beyond a boundary, {} shown above\n",
                self.other,
                self.shown.len()
            );
        }
        s
    }
}

/// Compares GPU rows with CPU rows of the same logits. A differing row counts
/// as `boundary` when its draws moved by one between ids that are neighbours
/// among the ids with mass (what a threshold at a CDF boundary does), else
/// `other`; the first [`SHOWN_ROWS`] `other` rows are described.
pub fn compare(
    gpu: &SampledRows,
    cpu: &SampledRows,
    logits: &[f32],
    vocab: usize,
    t: f32,
) -> Agreement {
    assert_eq!(gpu.num_rows(), cpu.num_rows());
    let mut a = Agreement { rows: cpu.num_rows(), ..Default::default() };
    for r in 0..cpu.num_rows() {
        let (g, c) = (gpu.row(r), cpu.row(r));
        a.lse_ulps = a.lse_ulps.max(ulps(g.lse, c.lse));
        if g.token_ids == c.token_ids && g.counts == c.counts {
            a.identical += 1;
            for (x, y) in g.logprobs.iter().zip(c.logprobs) {
                a.logprob_ulps = a.logprob_ulps.max(ulps(*x, *y));
            }
            continue;
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        if moved_across_boundaries(g.token_ids, g.counts, c.token_ids, c.counts, row, t) {
            a.boundary += 1;
        } else {
            a.other += 1;
            if a.shown.len() < SHOWN_ROWS {
                a.shown.push(describe(r, g.token_ids, g.counts, c.token_ids, c.counts));
            }
        }
    }
    a
}

/// How a row differs, by counts only.
fn describe(r: usize, gi: &[u32], gc: &[u32], ci: &[u32], cc: &[u32]) -> String {
    let diff = count_diff(gi, gc, ci, cc);
    let moved: i64 = diff.values().map(|d| d.abs()).sum();
    format!(
        "row {r}: gpu {} ids / {} draws, cpu {} ids / {} draws; {} ids differ, {moved} draws apart",
        gi.len(),
        gc.iter().map(|&c| u64::from(c)).sum::<u64>(),
        ci.len(),
        cc.iter().map(|&c| u64::from(c)).sum::<u64>(),
        diff.len()
    )
}

/// GPU count minus CPU count per id, where they differ.
fn count_diff(
    gi: &[u32],
    gc: &[u32],
    ci: &[u32],
    cc: &[u32],
) -> std::collections::BTreeMap<u32, i64> {
    let mut diff = std::collections::BTreeMap::<u32, i64>::new();
    for (i, c) in gi.iter().zip(gc) {
        *diff.entry(*i).or_default() += i64::from(*c);
    }
    for (i, c) in ci.iter().zip(cc) {
        *diff.entry(*i).or_default() -= i64::from(*c);
    }
    diff.retain(|_, d| *d != 0);
    diff
}

/// Whether the two count vectors differ only by draws moved to the next or
/// previous id with mass (at most 2 draws per row).
pub fn moved_across_boundaries(
    gi: &[u32],
    gc: &[u32],
    ci: &[u32],
    cc: &[u32],
    row: &[f32],
    t: f32,
) -> bool {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Ids with e_i > 0 (e underflows below about -103.97).
    let massive: Vec<u32> = (0..row.len() as u32)
        .filter(|&i| ((f64::from(row[i as usize]) - f64::from(m)) / f64::from(t)) > -103.9)
        .collect();
    let diff = count_diff(gi, gc, ci, cc);
    let moved: i64 = diff.values().map(|d| d.abs()).sum();
    if moved == 0 || moved > 4 || diff.values().sum::<i64>() != 0 {
        return false;
    }
    // Pair the ids in order: each pair is one boundary, adjacent ids with mass,
    // one losing what the other gains.
    let pos = |id: u32| massive.binary_search(&id).ok();
    let d: Vec<(u32, i64)> = diff.into_iter().collect();
    d.len().is_multiple_of(2)
        && d.chunks_exact(2).all(|p| {
            let adjacent = matches!((pos(p[0].0), pos(p[1].0)), (Some(a), Some(b)) if b == a + 1);
            adjacent && p[0].1 == -p[1].1
        })
}
