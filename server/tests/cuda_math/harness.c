/* Host build of server/src/sampler/cuda/logitd_math.cuh, the scalar arithmetic
 * of the CUDA sampling kernel, for server/tests/cuda_math.rs. Reads fixed-size
 * little-endian records on stdin and writes the results on stdout; the mode is
 * argv[1]. Built with contraction off, as nvcc builds the kernel (--fmad=false). */
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "../../src/sampler/cuda/logitd_math.cuh"

static int rd(void* p, size_t n) { return fread(p, 1, n, stdin) == n; }
static void wr(const void* p, size_t n) { fwrite(p, 1, n, stdout); }

static float f32(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static double f64(uint64_t b) { double d; memcpy(&d, &b, 8); return d; }
static uint64_t u64(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const char* mode = argv[1];
  if (!strcmp(mode, "expf")) {
    uint32_t x;
    while (rd(&x, 4)) {
      /* the f32 result, then the kernel's f64 form of it */
      uint32_t y = logitd_f32_bits(logitd_expf(f32(x)));
      uint64_t d = u64(logitd_expf_d((double)f32(x)));
      wr(&y, 4);
      wr(&d, 8);
    }
  } else if (!strcmp(mode, "weight")) {
    struct { uint32_t z, m; uint64_t inv_t; uint32_t t_is_one, pad; } r;
    while (rd(&r, sizeof r)) {
      uint32_t y = logitd_f32_bits(logitd_weight(f32(r.z), f32(r.m), f64(r.inv_t), (int)r.t_is_one));
      uint64_t d = u64(logitd_weight_d(f32(r.z), f32(r.m), f64(r.inv_t), (int)r.t_is_one));
      wr(&y, 4);
      wr(&d, 8);
    }
  } else if (!strcmp(mode, "round")) {
    uint64_t x;
    while (rd(&x, 8)) { uint64_t y = u64(logitd_round_f32(f64(x))); wr(&y, 8); }
  } else if (!strcmp(mode, "logprob")) {
    struct { uint32_t z, m; uint64_t inv_t, ln_sum; } r;
    while (rd(&r, sizeof r)) {
      uint32_t y[2] = {logitd_f32_bits(logitd_logprob(f32(r.z), f32(r.m), f64(r.inv_t), f64(r.ln_sum))),
                       logitd_f32_bits(logitd_lse(f32(r.m), f64(r.inv_t), f64(r.ln_sum)))};
      wr(y, 8);
    }
  } else if (!strcmp(mode, "philox")) {
    uint32_t r[6];
    while (rd(r, sizeof r)) { uint32_t w[4]; logitd_philox4x32_10(r, r[4], r[5], w); wr(w, 16); }
  } else if (!strcmp(mode, "uniform")) {
    uint32_t x;
    while (rd(&x, 4)) { uint64_t y = u64(logitd_uniform(x)); wr(&y, 8); }
  } else if (!strcmp(mode, "key_f32") || !strcmp(mode, "key_bf16") || !strcmp(mode, "key_f16")) {
    uint32_t x;
    while (rd(&x, 4)) {
      uint32_t y = !strcmp(mode, "key_f32") ? logitd_key_f32(f32(x))
                 : !strcmp(mode, "key_bf16") ? logitd_key_bf16(f32(x))
                 : logitd_key_f16((uint16_t)x);
      wr(&y, 4);
    }
  } else {
    return 2;
  }
  return fflush(stdout) == 0 ? 0 : 1;
}
