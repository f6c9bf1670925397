//! The CPU reference sampler: O(V + k) per row, no sort of the vocabulary.
//!
//! For a row z with max m and temperature T (inverse `inv_t` = 1/T in f64):
//!
//! 1. e_i = [`exp_f32`](((z_i − m) · inv_t) as f32), glibc's f32 exponential;
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
//! [`exp_f32`], fused multiply-adds included, so the same bits) and the max is
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

/// 2^(i/32), i = 0..31, rounded to f64, each minus i << 47, so that adding
/// ki << 47 both restores the table value and sets the power of two (glibc's
/// `__exp2f_data.tab`).
const EXP2F_TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe); // 32 / ln 2
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000); // 1.5 · 2^52
const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);
const UNDERFLOW: f32 = f32::from_bits(0xc2cf_f1b4); // log(2^-150) ≈ −103.972

/// e^x in f32 for x ≤ 0 (the exponential of step 1): the C library's `expf`
/// of x86-64 glibc (Szabolcs Nagy's table-driven algorithm, from ARM's
/// optimized-routines) as its FMA build computes it, bit for bit, written out
/// so that it vectorises: x·32/ln 2 = k + r, e^x = 2^(k/32) · (c0 r³ + c1 r² +
/// c2 r + 1), in f64 with the FMA build's fused multiply-adds, rounded once to
/// f32 (below 0.502 ulp). x < log(2^-150) (and −∞) gives 0. It is what
/// `f32::exp` returns on x86-64 Linux with FMA (on CPUs without FMA glibc's
/// generic build differs from it at one x of [−104, 0]); the CUDA kernel's
/// `logitd_expf` is the same function.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xd = f64::from(x);
    let kd = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(EXP2F_TAB[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = C0.mul_add(r, C1);
    let r2 = r * r;
    let y = C2.mul_add(r, 1.0);
    let y = z.mul_add(r2, y) * s;
    if x < UNDERFLOW { 0.0 } else { y as f32 }
}

/// [`exp_f32`] of four lanes with AVX2 and FMA: the same operations in the
/// same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp4_avx2(x: std::arch::x86_64::__m128) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let xd = _mm256_cvtps_pd(x);
    let inv = _mm256_set1_pd(INV_LN2_N);
    let shift = _mm256_set1_pd(SHIFT);
    let kd = _mm256_fmadd_pd(inv, xd, shift);
    let ki = _mm256_castpd_si256(kd);
    let kd = _mm256_sub_pd(kd, shift);
    // fma(inv, xd, −kd): one rounding, as mul_add.
    let r = _mm256_fmsub_pd(inv, xd, kd);
    // The table lookup as four scalar loads: a gather is microcoded and far
    // slower on some CPUs (AMD Zen 1: a third of the time of the whole row).
    let mut ks = [0u64; 4];
    // SAFETY: `ks` holds 32 bytes.
    unsafe { _mm256_storeu_si256(ks.as_mut_ptr().cast(), ki) };
    let tab = |k: u64| EXP2F_TAB[(k % 32) as usize] as i64;
    let t = _mm256_set_epi64x(tab(ks[3]), tab(ks[2]), tab(ks[1]), tab(ks[0]));
    let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
    let z = _mm256_fmadd_pd(_mm256_set1_pd(C0), r, _mm256_set1_pd(C1));
    let r2 = _mm256_mul_pd(r, r);
    let y = _mm256_fmadd_pd(_mm256_set1_pd(C2), r, _mm256_set1_pd(1.0));
    let y = _mm256_mul_pd(_mm256_fmadd_pd(z, r2, y), s);
    let under = _mm_cmplt_ps(x, _mm_set1_ps(UNDERFLOW));
    _mm_andnot_ps(under, _mm256_cvtpd_ps(y))
}

/// e_i = exp_f32(x_i) for the whole row with [`exp4_avx2`]; x_i as in step 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exps_avx2(z: &[f32], max: f32, inv_t: f64, exps: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = z.len().min(exps.len());
    let whole = n - n % 4;
    let (m, it) = (f64::from(max), inv_t);
    for i in (0..whole).step_by(4) {
        // SAFETY: i + 4 <= n, within both slices.
        unsafe {
            let v = _mm_loadu_ps(z.as_ptr().add(i));
            let x = if inv_t == 1.0 {
                _mm_sub_ps(v, _mm_set1_ps(max))
            } else {
                let d = _mm256_sub_pd(_mm256_cvtps_pd(v), _mm256_set1_pd(m));
                _mm256_cvtpd_ps(_mm256_mul_pd(d, _mm256_set1_pd(it)))
            };
            _mm_storeu_ps(exps.as_mut_ptr().add(i), exp4_avx2(x));
        }
    }
    for i in whole..n {
        exps[i] =
            exp_f32(if inv_t == 1.0 { z[i] - max } else { ((f64::from(z[i]) - m) * it) as f32 });
    }
}

/// [`exp_f32`] of eight lanes with AVX-512: the same operations in the same
/// order as [`exp4_avx2`] (and the scalar), so the same bits. The 32-entry
/// table is read with two two-source permutes and a blend on bit 4 of the
/// index (exact integer moves), where AVX2 needs four scalar loads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp8_avx512(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let xd = _mm512_cvtps_pd(x);
    let inv = _mm512_set1_pd(INV_LN2_N);
    let shift = _mm512_set1_pd(SHIFT);
    let kd = _mm512_fmadd_pd(inv, xd, shift);
    let ki = _mm512_castpd_si512(kd);
    let kd = _mm512_sub_pd(kd, shift);
    let r = _mm512_fmsub_pd(inv, xd, kd);
    // SAFETY: EXP2F_TAB holds 32 u64s, four vectors of 8.
    let (t0, t1, t2, t3) = unsafe {
        let p = EXP2F_TAB.as_ptr().cast::<__m512i>();
        (
            _mm512_loadu_si512(p),
            _mm512_loadu_si512(p.add(1)),
            _mm512_loadu_si512(p.add(2)),
            _mm512_loadu_si512(p.add(3)),
        )
    };
    // permutex2var uses bits 0–3 of each index (entries 0–15 of its two sources).
    let lo = _mm512_permutex2var_epi64(t0, ki, t1);
    let hi = _mm512_permutex2var_epi64(t2, ki, t3);
    let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
    let t = _mm512_mask_blend_epi64(upper, lo, hi);
    let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
    let z = _mm512_fmadd_pd(_mm512_set1_pd(C0), r, _mm512_set1_pd(C1));
    let r2 = _mm512_mul_pd(r, r);
    let y = _mm512_fmadd_pd(_mm512_set1_pd(C2), r, _mm512_set1_pd(1.0));
    let y = _mm512_mul_pd(_mm512_fmadd_pd(z, r2, y), s);
    let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(UNDERFLOW));
    _mm256_andnot_ps(under, _mm512_cvtpd_ps(y))
}

/// e_i = exp_f32(x_i) for the whole row with [`exp8_avx512`]; x_i as in step 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exps_avx512(z: &[f32], max: f32, inv_t: f64, exps: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = z.len().min(exps.len());
    let whole = n - n % 8;
    let (m, it) = (f64::from(max), inv_t);
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= n, within both slices.
        unsafe {
            let v = _mm256_loadu_ps(z.as_ptr().add(i));
            let x = if inv_t == 1.0 {
                _mm256_sub_ps(v, _mm256_set1_ps(max))
            } else {
                let d = _mm512_sub_pd(_mm512_cvtps_pd(v), _mm512_set1_pd(m));
                _mm512_cvtpd_ps(_mm512_mul_pd(d, _mm512_set1_pd(it)))
            };
            _mm256_storeu_ps(exps.as_mut_ptr().add(i), exp8_avx512(x));
        }
    }
    for i in whole..n {
        exps[i] =
            exp_f32(if inv_t == 1.0 { z[i] - max } else { ((f64::from(z[i]) - m) * it) as f32 });
    }
}

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

/// e_i = exp_f32(arg(z_i)), 32 at a time so the vector units get independent chains.
#[inline(always)]
fn each_exp(z: &[f32], exps: &mut [f32], arg: impl Fn(f32) -> f32) {
    const N: usize = 32;
    let mut e = exps.chunks_exact_mut(N);
    let mut v = z.chunks_exact(N);
    for (ec, zc) in e.by_ref().zip(v.by_ref()) {
        for l in 0..N {
            ec[l] = exp_f32(arg(zc[l]));
        }
    }
    for (e, &v) in e.into_remainder().iter_mut().zip(v.remainder()) {
        *e = exp_f32(arg(v));
    }
}

/// Step 1: e_i for every id.
#[inline(always)]
fn exps(z: &[f32], max: f32, inv_t: f64, exps: &mut [f32]) {
    if inv_t == 1.0 {
        // f32 subtraction rounds the exact z − m once, as the f64 path does
        // (an f64 difference of two f32s is exact unless one is below 2^-29 of
        // the other, and then both round to the same f32).
        each_exp(z, exps, |v| v - max);
    } else {
        let m = f64::from(max);
        each_exp(z, exps, |v| ((f64::from(v) - m) * inv_t) as f32);
    }
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

/// Whether the CPU runs the AVX-512 build of the exponentials (AVX-512F, and
/// the AVX2 + FMA the rest of that build uses), unless
/// [`AVX512_OFF_ENV`] keeps them on AVX2.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && avx2_fma() && !avx512_turned_off()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `LOGITD_CPU_SIMD=avx2` keeps logitd's own CPU code (the exponentials of
/// the sampler, the attention softmax and the SiLU) on its AVX2 build on a CPU
/// with AVX-512, as on one without: for CPUs that slow their clock under
/// AVX-512, and to measure the AVX2 path. (gemm's matmul kernels follow the
/// build instead: `--no-default-features` leaves out their AVX-512 ones.)
pub const AVX512_OFF_ENV: &str = "LOGITD_CPU_SIMD";

/// Whether [`AVX512_OFF_ENV`] says `avx2` (read once; `native` or unset:
/// the CPU's best; another value is reported once and ignored).
fn avx512_turned_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| match std::env::var(AVX512_OFF_ENV).as_deref() {
        Ok("avx2") => true,
        Ok("native") | Err(_) => false,
        Ok(other) => {
            tracing::warn!("{AVX512_OFF_ENV}={other:?} is neither avx2 nor native: ignored");
            false
        }
    })
}

/// Which build of logitd's CPU exponentials runs here: "avx512", "avx2" or
/// "scalar" (logged when a teacher loads).
pub fn simd_build() -> &'static str {
    if avx512() {
        "avx512"
    } else if avx2_fma() {
        "avx2"
    } else {
        "scalar"
    }
}

/// Whether the CPU runs the AVX2 + FMA builds.
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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

/// e_i = [`exp_f32`](z_i − max) for every i, in the fastest build the CPU runs
/// (AVX-512F, else AVX2 + FMA, else scalar): the same bits in all three. Every
/// z_i − max must be ≤ 0 (or NaN). This is what `f32::exp` gives on x86-64
/// Linux, so a softmax built on it equals one built on `f32::exp`; the CPU
/// attention kernel's softmax uses it.
pub fn exps_below_max(z: &[f32], max: f32, out: &mut [f32]) {
    assert_eq!(z.len(), out.len(), "exps_below_max: input and output lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked just now).
        return unsafe { exps_avx512(z, max, 1.0, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just now).
        return unsafe { exps_avx2(z, max, 1.0, out) };
    }
    exps(z, max, 1.0, out);
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
mod tests {
    use super::*;

    /// Distance of `got` from e^x in units in the last place of the f32 result,
    /// with e^x from the f64 exponential (an independent reference).
    fn ulps(got: f32, x: f32) -> f64 {
        let want = f64::from(x).exp();
        let near = want as f32;
        let ulp = if near == 0.0 {
            f64::from(f32::from_bits(1))
        } else {
            f64::from(f32::from_bits(near.to_bits() + 1)) - f64::from(near)
        };
        (f64::from(got) - want).abs() / ulp
    }

    /// Where glibc's generic expf differs from its FMA build in [−104, 0].
    const GENERIC_GLIBC_DIFFERS: f32 = f32::from_bits(0xc27c_65d9);

    #[test]
    fn exp_f32_is_glibcs_expf_and_within_half_an_ulp() {
        // Every 61st f32 from -0 down to -104.5, and the one where glibc's builds differ.
        let mut worst = 0.0f64;
        let mut mismatches = vec![];
        let mut bits = 0x8000_0000u32;
        let mut xs = vec![GENERIC_GLIBC_DIFFERS];
        while f32::from_bits(bits) >= -104.5 {
            xs.push(f32::from_bits(bits));
            bits += 61;
        }
        for x in xs {
            let e = exp_f32(x);
            worst = worst.max(ulps(e, x));
            #[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
            if e.to_bits() != x.exp().to_bits() {
                mismatches.push(x);
            }
        }
        assert!(worst < 0.502, "{worst} ulp");
        assert!(worst > 0.5, "the sweep met rounding errors ({worst})");
        // Without FMA, glibc runs its generic build, which differs at one x.
        let allowed = if avx2_fma() { vec![] } else { vec![GENERIC_GLIBC_DIFFERS] };
        assert!(mismatches.iter().all(|x| allowed.contains(x)), "{mismatches:?}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        // Subnormal results: e^-100 ≈ 3.7e-44, e^-103.5 rounds to the smallest.
        assert!(ulps(exp_f32(-100.0), -100.0) < 0.502);
        assert_eq!(exp_f32(-103.5), f32::from_bits(1));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_fma_build_gives_the_same_bits() {
        // Without AVX2 and FMA the "fastest" functions are the portable ones,
        // and this test would compare the portable build with itself: say so
        // loudly instead of passing quietly (LOGITD_REQUIRE_AVX2=1 fails).
        if !avx2_fma() {
            let msg = "the_avx2_fma_build_gives_the_same_bits: this CPU has no AVX2+FMA, \
                       so the AVX2 build was NOT compared with the portable one";
            assert!(std::env::var_os("LOGITD_REQUIRE_AVX2").is_none(), "{msg}");
            eprintln!("\n!!!!! SKIPPED: {msg} !!!!!\n");
            return;
        }
        let z: Vec<f32> =
            (0..5 * BLOCK * GROUP + 77).map(|i| ((i * 7919) % 30_011) as f32 * -0.0037).collect();
        let marks = z.len().div_ceil(BLOCK) * SPANS;
        let mut plain = (vec![0.0; z.len()], vec![0.0; marks], vec![]);
        let mut fast = plain.clone();
        for inv_t in [1.0, 1.0 / 0.7] {
            exps(&z, 0.0, inv_t, &mut plain.0);
            block_sums(&plain.0, &mut plain.1, &mut plain.2);
            // The AVX2 build itself (on an AVX-512 CPU "fastest" is the AVX-512 one).
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { exps_and_sums_avx2(&z, 0.0, inv_t, &mut fast.0, &mut fast.1, &mut fast.2) };
            assert_eq!(plain, fast);
        }
        assert_eq!(max_and_bad(&z), max_and_bad_fastest(&z));
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        let compared = sweep_vector_build(|z, m, t, e| unsafe { exps_avx2(z, m, t, e) });
        assert_eq!(compared, u64::from((-104.5f32).to_bits() - 0x8000_0000) + 1 + 6);
        // Zeros of both signs as the max, NaN, ±inf, at every lane and in the tail.
        let specials = [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3.5];
        for len in [1, 15, 16, 17, 40] {
            for at in 0..len {
                for &a in &specials {
                    for &b in &specials[..2] {
                        let mut v = vec![-1.0f32; len];
                        v[at] = a;
                        v[(at * 7 + 3) % len] = b;
                        let (want, got) = (max_and_bad(&v), max_and_bad_fastest(&v));
                        assert_eq!((want.0.to_bits(), want.1), (got.0.to_bits(), got.1), "{v:?}");
                    }
                }
            }
        }
    }

    /// Every f32 of [−104.5, 0] (and −0, −inf, large negatives) through `exps` of one
    /// vector build, compared bit for bit with the scalar [`exp_f32`]; then a row at
    /// T = 1 and T = 0.7 with its block sums. Returns how many inputs were compared.
    #[cfg(target_arch = "x86_64")]
    fn sweep_vector_build(build: fn(&[f32], f32, f64, &mut [f32])) -> u64 {
        let limit = (-104.5f32).to_bits();
        let mut xs: Vec<f32> = vec![0.0, -0.0, f32::NEG_INFINITY, -1000.0, f32::MIN, -104.0];
        let mut got = vec![0.0f32; 1 << 20];
        let mut compared = 0u64;
        let mut next = 0x8000_0000u32;
        loop {
            while xs.len() < got.len() && next <= limit {
                xs.push(f32::from_bits(next));
                next += 1;
            }
            build(&xs, 0.0, 1.0, &mut got[..xs.len()]);
            for (x, e) in xs.iter().zip(&got) {
                assert_eq!(e.to_bits(), exp_f32(*x).to_bits(), "exp({x:e})");
            }
            compared += xs.len() as u64;
            xs.clear();
            if next > limit {
                return compared;
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx512_build_gives_the_same_bits_on_every_float_of_the_range() {
        // As for AVX2: say loudly when the CPU cannot run the build under test
        // (LOGITD_REQUIRE_AVX512=1 fails instead).
        if !avx512() {
            let msg = "the_avx512_build_gives_the_same_bits_on_every_float_of_the_range: this \
                       CPU has no AVX-512F, so the AVX-512 build was NOT compared with the scalar one";
            assert!(std::env::var_os("LOGITD_REQUIRE_AVX512").is_none(), "{msg}");
            eprintln!("\n!!!!! SKIPPED: {msg} !!!!!\n");
            return;
        }
        // SAFETY (both closures): the CPU has AVX-512F, AVX2 and FMA (checked above).
        let compared = sweep_vector_build(|z, m, t, e| unsafe { exps_avx512(z, m, t, e) });
        // 0x8000_0000 ..= bits of −104.5: 1,121,320,961 floats, plus 6 specials.
        assert_eq!(compared, u64::from((-104.5f32).to_bits() - 0x8000_0000) + 1 + 6);
        let z: Vec<f32> =
            (0..5 * BLOCK * GROUP + 77).map(|i| ((i * 7919) % 30_011) as f32 * -0.0037).collect();
        let fresh =
            || (vec![0.0f32; z.len()], vec![0.0f64; z.len().div_ceil(BLOCK) * SPANS], vec![]);
        for inv_t in [1.0, 1.0 / 0.7, 1.0 / 1.3] {
            let (mut plain, mut v512, mut fastest) = (fresh(), fresh(), fresh());
            exps(&z, 0.0, inv_t, &mut plain.0);
            block_sums(&plain.0, &mut plain.1, &mut plain.2);
            unsafe { exps_and_sums_avx512(&z, 0.0, inv_t, &mut v512.0, &mut v512.1, &mut v512.2) };
            assert_eq!(plain, v512);
            let (e, m, b) = &mut fastest;
            exps_and_sums_fastest(&z, 0.0, inv_t, e, m, b);
            assert_eq!(plain, fastest);
        }
    }

    #[test]
    fn block_sums_and_running_sums_are_sequential_per_block() {
        let z: Vec<f32> = (0..3 * BLOCK * GROUP + 300).map(|i| (i % 97) as f32 * -0.05).collect();
        let blocks = z.len().div_ceil(BLOCK);
        let (mut e, mut m, mut b) = (vec![0.0; z.len()], vec![0.0; blocks * SPANS], vec![]);
        exps(&z, 0.0, 1.0, &mut e);
        block_sums(&e, &mut m, &mut b);
        assert_eq!(b.len(), blocks);
        let mut spans_seen = 0;
        for (blk, chunk) in e.chunks(BLOCK).enumerate() {
            let mut acc = 0.0f64;
            for (i, &v) in chunk.iter().enumerate() {
                acc += f64::from(v);
                if i % SPAN == SPAN - 1 || i == chunk.len() - 1 {
                    assert_eq!(m[blk * SPANS + i / SPAN], acc, "block {blk}, id {i}");
                    spans_seen += 1;
                }
            }
            assert_eq!(b[blk], acc);
        }
        // 3 · GROUP full blocks of 16 spans, one of 256 ids, one of 44 (3 spans).
        assert_eq!(spans_seen, (3 * GROUP + 1) * SPANS + 3);
    }

    /// Steps 1–4 of the module's description written out plainly, one threshold
    /// at a time over every block from the first, every id's running sum kept:
    /// no group sums, no skipped work, no search. Returns (id, count, log p)
    /// per distinct id, and the lse.
    fn plain_sample(z: &[f32], t: f32, k: usize, key: RowKey) -> (Vec<(u32, u32, f32)>, f32) {
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
        let inv_t = 1.0 / f64::from(t);
        let arg = |v: f32| ((f64::from(v) - f64::from(m)) * inv_t) as f32;
        let e: Vec<f32> = z.iter().map(|&v| exp_f32(arg(v))).collect();
        let (mut l, mut b) = (vec![], vec![]);
        for chunk in e.chunks(BLOCK) {
            let mut acc = 0.0f64;
            for &v in chunk {
                acc += f64::from(v);
                l.push(acc);
            }
            b.push(acc);
        }
        let s = b.iter().fold(0.0f64, |a, &v| a + v);
        let (mut g, mut gs) = (0.0f64, vec![]);
        for j in 0..=k {
            let word = philox4x32_10(key.counter((j / 4) as u32), key.philox_key())[j % 4];
            g += -((f64::from(word) + 0.5) / 4_294_967_296.0).ln();
            gs.push(g);
        }
        let mut ids: Vec<usize> = vec![];
        for &gj in &gs[..k] {
            let tj = gj * (s / g);
            let mut a = 0.0f64;
            let mut found = None;
            for (blk, &bb) in b.iter().enumerate() {
                if tj - a >= bb {
                    a += bb;
                    continue;
                }
                let x = tj - a;
                let range = blk * BLOCK..(blk * BLOCK + BLOCK).min(z.len());
                found = Some(if x < 0.0 {
                    range.clone().find(|&i| e[i] > 0.0).unwrap()
                } else {
                    range
                        .clone()
                        .find(|&i| l[i] > x && (i == range.start || l[i - 1] <= x))
                        .unwrap()
                });
                break;
            }
            ids.push(found.unwrap_or_else(|| (0..z.len()).rev().find(|&i| e[i] > 0.0).unwrap()));
        }
        let mut rows: Vec<(u32, u32, f32)> = vec![];
        for id in ids {
            match rows.last_mut() {
                Some(r) if r.0 == id as u32 => r.1 += 1,
                _ => rows.push((
                    id as u32,
                    1,
                    ((f64::from(z[id]) - f64::from(m)) * inv_t - s.ln()) as f32,
                )),
            }
        }
        (rows, (f64::from(m) * inv_t + s.ln()) as f32)
    }

    #[test]
    fn the_walk_gives_the_rows_of_the_plain_description() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut rows: Vec<Vec<f32>> = vec![];
        for vocab in [1usize, 2, 255, 256, 257, 3000, BLOCK * GROUP * 2 + 77] {
            // Flat (thresholds in every block), noisy Zipf, one spike, and whole
            // masked blocks and single masked ids in a noisy row.
            rows.push(vec![0.25; vocab]);
            rows.push(
                (0..vocab).map(|i| -1.1 * ((i * 7919 % vocab + 1) as f32).ln() + next()).collect(),
            );
            let mut spike = vec![-3.0f32; vocab];
            spike[vocab * 2 / 3] = 9.0;
            rows.push(spike);
            let masked = (0..vocab)
                .map(|i| {
                    if (i / BLOCK) % 3 == 1 || i % 5 == 2 {
                        f32::NEG_INFINITY
                    } else {
                        next() * 8.0
                    }
                })
                .collect::<Vec<_>>();
            if masked.iter().any(|&v| v > f32::NEG_INFINITY) {
                rows.push(masked);
            }
        }
        let mut sampler = CpuSampler::new();
        let mut checked = 0;
        for (r, z) in rows.iter().enumerate() {
            for (t, k) in [(1.0f32, 256usize), (0.5, 7), (3.0, 1024), (1.0, 1)] {
                let key = RowKey { seed: 11, sequence: r as u32, position: k as u32 };
                let params = SamplingParams::new(Method::Sample, k as u32, t).unwrap();
                let mut out = SampledRows::new();
                sampler.sample_row(z, &params, key, &mut out).unwrap();
                let (want, lse) = plain_sample(z, t, k, key);
                let got: Vec<(u32, u32, f32)> = (0..out.token_ids.len())
                    .map(|i| (out.token_ids[i], out.counts[i], out.logprobs[i]))
                    .collect();
                assert_eq!(got, want, "row {r} (V = {}), T = {t}, k = {k}", z.len());
                assert_eq!(out.lse, vec![lse]);
                checked += 1;
            }
        }
        assert_eq!(checked, 4 * rows.len());
    }

    #[test]
    fn threads_give_the_same_rows_as_one_thread() {
        let vocab = 3000;
        let rows = 37;
        let z: Vec<f32> =
            (0..vocab * rows).map(|i| ((i * 7919 % 10_007) as f32 * 0.001).sin() * 6.0).collect();
        let keys: Vec<RowKey> =
            (0..rows as u32).map(|p| RowKey { seed: 3, sequence: 1, position: p }).collect();
        for params in [
            SamplingParams::new(Method::Sample, 256, 1.0).unwrap(),
            SamplingParams::new(Method::Sample, 64, 0.6).unwrap(),
            SamplingParams::new(Method::TopK, 20, 1.0).unwrap(),
            SamplingParams::new(Method::None, 1, 1.0).unwrap(),
        ] {
            // Every row scores its realised token and row r r % 4 candidates.
            let realised: Vec<u32> = (0..rows as u32).map(|p| p * 13 % vocab as u32).collect();
            let mut offsets = vec![0u32];
            for r in 0..rows as u32 {
                offsets.push(offsets[r as usize] + r % 4);
            }
            let ids: Vec<u32> = (0..offsets[rows]).map(|i| i * 101 % vocab as u32).collect();
            let q = RowQueries {
                realised: &realised,
                candidate_offsets: &offsets,
                candidate_ids: &ids,
            };
            for queries in [RowQueries::NONE, q] {
                let mut one = SampledRows::new();
                CpuSampler::new()
                    .sample_rows_on(1, &z, vocab, &params, &keys, queries, &mut one)
                    .unwrap();
                for threads in [2, 3, 8] {
                    // Appended after a row already there, as the engine does per chunk.
                    let mut many = SampledRows::new();
                    let mut s = CpuSampler::new();
                    let first = queries.rows(0..1);
                    s.sample_rows_on(1, &z[..vocab], vocab, &params, &keys[..1], first, &mut many)
                        .unwrap();
                    s.sample_rows_on(threads, &z, vocab, &params, &keys, queries, &mut many)
                        .unwrap();
                    assert_eq!(many.slice(1..rows + 1), one, "{threads} threads");
                }
            }
        }
    }

    #[test]
    fn a_failing_row_keeps_the_rows_before_it_with_threads() {
        let vocab = 100;
        let mut z = vec![0.5f32; vocab * 10];
        z[6 * vocab + 3] = f32::NAN;
        let keys = vec![RowKey { seed: 1, sequence: 0, position: 0 }; 10];
        let params = SamplingParams::new(Method::Sample, 8, 1.0).unwrap();
        let mut out = SampledRows::new();
        let e = CpuSampler::new().sample_rows_on(
            4,
            &z,
            vocab,
            &params,
            &keys,
            RowQueries::NONE,
            &mut out,
        );
        assert!(matches!(e, Err(SamplerError::NonFiniteLogit { index: 3, .. })));
        assert_eq!(out.num_rows(), 6);
    }
}
