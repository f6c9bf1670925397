//! e^x in f32 for x ≤ 0, bit for bit glibc's `expf` (FMA build), in three
//! builds with the same bits: portable (scalar, written so that it
//! vectorises), AVX2 + FMA (four lanes) and AVX-512F (eight lanes).
//! [`super`] picks the build the CPU runs.

use super::{avx2_fma, avx512};

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

/// e^x in f32 for x ≤ 0 (the sampler's e_i and the softmax of the CPU attention): the C library's `expf`
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

/// e_i = exp_f32(x_i) for the whole row with [`exp4_avx2`]; x_i = z_i − max at T = 1, else ((z_i − max) · inv_t) rounded to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exps_avx2(z: &[f32], max: f32, inv_t: f64, exps: &mut [f32]) {
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

/// e_i = exp_f32(x_i) for the whole row with [`exp8_avx512`]; x_i = z_i − max at T = 1, else ((z_i − max) · inv_t) rounded to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) fn exps_avx512(z: &[f32], max: f32, inv_t: f64, exps: &mut [f32]) {
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

/// e_i = [`exp_f32`](x_i) for every i, x_i as in [`exps_avx2`] (the portable build).
#[inline(always)]
pub(crate) fn exps(z: &[f32], max: f32, inv_t: f64, exps: &mut [f32]) {
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
}
