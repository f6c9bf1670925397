// Scalar arithmetic of the sampling contract, shared by the CUDA kernel
// (sampler.cu) and by a host build of this same file that a CPU test compares
// with the Rust reference (server/tests/cuda_math.rs). Compile with contraction
// off (nvcc --fmad=false, gcc -ffp-contract=off): every fused multiply-add below
// is written out as fma, every other operation is rounded on its own, as Rust
// rounds it.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define LOGITD_HD __device__ __forceinline__
#define LOGITD_FMA(a, b, c) __fma_rn((a), (b), (c))
// A global table read through the read-only cache: lanes index it freely
// (constant memory would serialise different indices).
#define LOGITD_TABLE __device__ const
#define LOGITD_TAB(i) __ldg(&LOGITD_EXP2F_TAB[i])
#else
#include <math.h>
#include <string.h>
#define LOGITD_HD static inline
#define LOGITD_FMA(a, b, c) fma((a), (b), (c))
#define LOGITD_TABLE static const
#define LOGITD_TAB(i) LOGITD_EXP2F_TAB[i]
#endif

LOGITD_HD uint64_t logitd_as_u64(double d) {
#ifdef __CUDA_ARCH__
  return (uint64_t)__double_as_longlong(d);
#else
  uint64_t u;
  memcpy(&u, &d, sizeof u);
  return u;
#endif
}

LOGITD_HD double logitd_as_f64(uint64_t u) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double((long long)u);
#else
  double d;
  memcpy(&d, &u, sizeof d);
  return d;
#endif
}

LOGITD_HD uint32_t logitd_f32_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// ---------------------------------------------------------------------------
// expf, bit for bit as the CPU reference computes it.
//
// The reference's e_i is server/src/kernels/exp.rs's exp_f32: x86-64 glibc's
// expf (2.28 and later; Szabolcs Nagy's table-driven algorithm from ARM
// optimized-routines) as glibc's FMA build computes it, the compiler having
// fused the reduction r = InvLn2N * x - kd and the polynomial. Written out
// here with the same fusions, this function returns the same bits on every x
// in [-104, 0] when compiled for the host (on the device, with --fmad=false,
// that is the goal until tests/gpu/run.sh has run) (server/tests/cuda_math.rs compares it with exp_f32; against
// glibc 2.36's own expf on all 1,120,927,745 floats of that range it differed
// nowhere, while glibc's generic build differs from it at x = -0x1.f8cbb2p+5).
// The sampler only ever takes exp of x <= 0.
//
// 2^(i/32), i = 0..31, rounded to double, each minus i << 47, so that adding
// ki << 47 both restores the table value and sets the power of two.
LOGITD_TABLE unsigned long long LOGITD_EXP2F_TAB[32] = {
    0x3ff0000000000000ULL, 0x3fefd9b0d3158574ULL, 0x3fefb5586cf9890fULL, 0x3fef9301d0125b51ULL,
    0x3fef72b83c7d517bULL, 0x3fef54873168b9aaULL, 0x3fef387a6e756238ULL, 0x3fef1e9df51fdee1ULL,
    0x3fef06fe0a31b715ULL, 0x3feef1a7373aa9cbULL, 0x3feedea64c123422ULL, 0x3feece086061892dULL,
    0x3feebfdad5362a27ULL, 0x3feeb42b569d4f82ULL, 0x3feeab07dd485429ULL, 0x3feea47eb03a5585ULL,
    0x3feea09e667f3bcdULL, 0x3fee9f75e8ec5f74ULL, 0x3feea11473eb0187ULL, 0x3feea589994cce13ULL,
    0x3feeace5422aa0dbULL, 0x3feeb737b0cdc5e5ULL, 0x3feec49182a3f090ULL, 0x3feed503b23e255dULL,
    0x3feee89f995ad3adULL, 0x3feeff76f2fb5e47ULL, 0x3fef199bdd85529cULL, 0x3fef3720dcef9069ULL,
    0x3fef5818dcfba487ULL, 0x3fef7c97337b9b5fULL, 0x3fefa4afa2a490daULL, 0x3fefd0765b6e4540ULL,
};

// (double)(float)y, the double of y rounded to f32, without the two
// conversions (a conversion to or from f64 issues at a quarter of the FP64
// rate on sm_80/sm_90): in the range where f32 is normal, the 52-bit
// significand is rounded to 23 bits, to nearest even, in the integers, which
// is what the conversion does; elsewhere (tiny, huge or non-finite y) by the
// conversions themselves.
LOGITD_HD double logitd_round_f32(double y) {
  const double a = y < 0.0 ? -y : y;
  if (a >= 0x1p-126 && a < 0x1p127) {
    uint64_t b = logitd_as_u64(y);
    b += 0x0FFFFFFFull + ((b >> 29) & 1u);
    b &= ~0x1FFFFFFFull;
    return logitd_as_f64(b);
  }
  return (double)(float)y;
}

// exp(x) rounded to f32, as a double, for x <= 0 given as the double of an
// f32 (x may be -inf; never NaN).
LOGITD_HD double logitd_expf_d(double xd) {
  // Below log(2^-150) the result rounds to 0 (glibc: __math_uflowf); -inf too.
  if (xd < (double)-0x1.9fe368p6f) return 0.0;
  const double inv_ln2_n = 0x1.71547652b82fep+0 * 32.0;
  const double shift = 0x1.8p+52;
  const double c0 = 0x1.c6af84b912394p-5 / 32.0 / 32.0 / 32.0;
  const double c1 = 0x1.ebfce50fac4f3p-3 / 32.0 / 32.0;
  const double c2 = 0x1.62e42ff0c52d6p-1 / 32.0;
  // x*N/ln2 = k + r with r in [-1/2, 1/2] and integer k.
  double kd = LOGITD_FMA(inv_ln2_n, xd, shift);
  uint64_t ki = logitd_as_u64(kd);
  kd -= shift;
  double r = LOGITD_FMA(inv_ln2_n, xd, -kd);
  // exp(x) = 2^(k/N) * 2^(r/N) ~= s * (c0 r^3 + c1 r^2 + c2 r + 1)
  uint64_t t = (uint64_t)LOGITD_TAB(ki % 32);
  t += ki << 47;
  double s = logitd_as_f64(t);
  double z = LOGITD_FMA(c0, r, c1);
  double r2 = r * r;
  double y = LOGITD_FMA(c2, r, 1.0);
  y = LOGITD_FMA(z, r2, y);
  y = y * s;
  // 0 < y < 2: only the low end leaves f32's normal range.
  if (y >= 0x1p-126) {
    uint64_t b = logitd_as_u64(y);
    b += 0x0FFFFFFFull + ((b >> 29) & 1u);
    b &= ~0x1FFFFFFFull;
    return logitd_as_f64(b);
  }
  return (double)(float)y;
}

// exp(x) for x <= 0 (x may be -inf; never NaN).
LOGITD_HD float logitd_expf(float x) { return (float)logitd_expf_d((double)x); }

// e_i of the reference, exp(((z - m) * inv_t) as f32), as the double of that
// f32 (what the kernel sums). With T = 1 the f32 difference z - m is the same
// number: the double difference rounded to f32 is correctly rounded
// (53 >= 2 * 24 + 2, so double rounding is innocuous).
LOGITD_HD double logitd_weight_d(float z, float m, double inv_t, int t_is_one) {
  double x;
  if (t_is_one) {
    x = (double)(z - m);
  } else {
    x = logitd_round_f32(((double)z - (double)m) * inv_t);
  }
  return logitd_expf_d(x);
}

// e_i as an f32.
LOGITD_HD float logitd_weight(float z, float m, double inv_t, int t_is_one) {
  return (float)logitd_weight_d(z, m, inv_t, t_is_one);
}

// log p_i of the reference: ((z - m) * inv_t - ln S) as f32, in double.
LOGITD_HD float logitd_logprob(float z, float m, double inv_t, double ln_sum) {
  double a = ((double)z - (double)m) * inv_t;
  return (float)(a - ln_sum);
}

// lse of the reference: (m * inv_t + ln S) as f32.
LOGITD_HD float logitd_lse(float m, double inv_t, double ln_sum) {
  double a = (double)m * inv_t;
  return (float)(a + ln_sum);
}

// ---------------------------------------------------------------------------
// Philox4x32-10 (Random123), as server/src/sampler/philox.rs.
LOGITD_HD void logitd_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  *lo = (uint32_t)p;
}

LOGITD_HD void logitd_philox4x32_10(const uint32_t counter[4], uint32_t k0, uint32_t k1,
                                     uint32_t out[4]) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    logitd_mulhilo(0xD2511F53u, c0, &hi0, &lo0);
    logitd_mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0;
    uint32_t n1 = lo1;
    uint32_t n2 = hi0 ^ c3 ^ k1;
    uint32_t n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The uniform in (0, 1) of a Philox word, exactly: (x + 1/2) / 2^32.
LOGITD_HD double logitd_uniform(uint32_t word) {
  return ((double)word + 0.5) * (1.0 / 4294967296.0);
}

// ---------------------------------------------------------------------------
// Order-preserving keys for top-k: a larger key is a larger value. Only finite
// values and -0/+0 are keyed (NaN and +inf are rejected, -inf is skipped).
LOGITD_HD uint32_t logitd_key_bits(uint32_t bits, uint32_t sign) {
  return (bits & sign) ? ~bits : (bits | sign);
}

// f32 logits: the 32-bit key of the value.
LOGITD_HD uint32_t logitd_key_f32(float z) {
  return logitd_key_bits(logitd_f32_bits(z), 0x80000000u);
}

// bf16 logits (z is a bf16 value held in an f32): the 16-bit key of its bf16
// bits, which are the high half of its f32 bits.
LOGITD_HD uint32_t logitd_key_bf16(float z) {
  return logitd_key_bits(logitd_f32_bits(z) >> 16, 0x8000u) & 0xFFFFu;
}

// f16 logits: the 16-bit key of the raw half bits.
LOGITD_HD uint32_t logitd_key_f16(uint16_t half_bits) {
  return logitd_key_bits(half_bits, 0x8000u) & 0xFFFFu;
}
