// The CUDA sampling kernel: the sampling contract of server/src/sampler/cpu.rs,
// one thread block per row, reading the logits (f32, f16 or bf16) where the LM
// head left them.
//
// A row of V logits is cut into tiles of 256 ids; a lane of a warp handles 8
// consecutive ids of a tile.
//
//   pass 1  max over the row; the first NaN/+inf (an error, as on the CPU);
//           how many logits are finite (top-k).
//   pass 2  e_i = exp(((z_i - m) / T) as f32) with the reference's own expf
//           (logitd_math.cuh: written to give the CPU's bits, checked on the host by
//           server/tests/cuda_math.rs, not yet on a GPU), and the f64 sum of
//           every tile. Tiles are visited last to first, so the end of the row,
//           read last in pass 1, is read again while it is still in L2.
//   scan    tile ends: the f64 cumulative sum of the tile sums, made
//           non-decreasing (a running max) so every threshold has exactly one
//           tile; the last tile with positive mass ends at +inf, so no draw is
//           lost to rounding; S, the row total, gives ln S and the lse.
// sample:   k + 1 exponentials -log(u) from Philox (the reference's stream),
//           their cumulative sums G_j, thresholds t_j = G_j * S / G_k (sorted);
//           each tile with thresholds is walked by one warp: e_i again, the
//           cumulative sum inside the tile, each id takes the thresholds below
//           its end (again non-decreasing, the tile's last positive id ending at
//           +inf), so the counts of a row always sum to k and a masked id (-inf)
//           is never drawn. Entries land in slots indexed by their first
//           threshold, which keeps them in id order; a block scan compacts them.
// top-k:    a radix select (8 bits a pass over the value's order-preserving key)
//           finds the k-th largest finite logit; ids above it, and the lowest
//           ids equal to it, are written in id order.
//
// Output: a row reserves its entries with one atomicAdd on `cursor` and writes
// them (id, count, log p) there; `meta` records, per row, where they start, how
// many there are, a status and the row's lse. The host maps these buffers
// (pinned, device-mapped), so the kernel's writes are the one transfer.
//
// Compiled with --fmad=false: no multiply-add is fused unless written as fma.

#include <cuda_fp16.h>

#include "logitd_math.cuh"

#define LOGITD_THREADS 512
#define LOGITD_WARPS (LOGITD_THREADS / 32)
#define LOGITD_TILE 256
#define LOGITD_UNROLL 4
// Resident blocks per SM the compiler must allow (registers <= 65536 / (512 *
// 2) = 64 a thread): while one block scans its tile sums or walks tiles,
// another streams its row from memory.
#define LOGITD_MIN_BLOCKS 2
#define LOGITD_EMPTY 0xFFFFFFFFu
#define LOGITD_FULL 0xFFFFFFFFu

// meta words per row (kept in sync with server/src/sampler/gpu_layout.rs)
#define META_START 0
#define META_LEN 1
#define META_STATUS 2
#define META_ERR_INDEX 3
#define META_ERR_VALUE 4
#define META_LSE 5
#define META_WORDS 8

#define STATUS_OK 0u
#define STATUS_NON_FINITE 1u
#define STATUS_ALL_MASKED 2u

#define METHOD_SAMPLE 0u
#define METHOD_TOP_K 1u

struct DF32 {
  typedef float raw;
};
struct DBF16 {
  typedef unsigned short raw;
};
struct DF16 {
  typedef unsigned short raw;
};

template <class D>
__device__ __forceinline__ float to_f32(typename D::raw r);
template <>
__device__ __forceinline__ float to_f32<DF32>(float r) {
  return r;
}
template <>
__device__ __forceinline__ float to_f32<DBF16>(unsigned short r) {
  return __uint_as_float(((unsigned)r) << 16);
}
template <>
__device__ __forceinline__ float to_f32<DF16>(unsigned short r) {
  return __half2float(__ushort_as_half(r));
}

template <class D>
__device__ __forceinline__ unsigned key_of(float z);
template <>
__device__ __forceinline__ unsigned key_of<DF32>(float z) {
  return logitd_key_f32(z);
}
template <>
__device__ __forceinline__ unsigned key_of<DBF16>(float z) {
  return logitd_key_bf16(z);
}
template <>
__device__ __forceinline__ unsigned key_of<DF16>(float z) {
  // z came from a half, so this conversion is exact.
  return logitd_key_f16(__half_as_ushort(__float2half_rn(z)));
}

template <class D>
struct KeyBits {
  enum { value = 16 };
};
template <>
struct KeyBits<DF32> {
  enum { value = 32 };
};

// Logits id0 .. id0 + 7 of a row; ids past the row read as -inf (no mass).
template <class D>
__device__ __forceinline__ void load8(const typename D::raw* __restrict__ row, unsigned vocab,
                                      unsigned id0, bool vec_ok, float z[8]) {
  if (vec_ok && id0 + 8 <= vocab) {
    if constexpr (sizeof(typename D::raw) == 4) {
      const float4* p = reinterpret_cast<const float4*>(row + id0);
      float4 a = __ldg(p);
      float4 b = __ldg(p + 1);
      z[0] = a.x;
      z[1] = a.y;
      z[2] = a.z;
      z[3] = a.w;
      z[4] = b.x;
      z[5] = b.y;
      z[6] = b.z;
      z[7] = b.w;
    } else {
      uint4 a = __ldg(reinterpret_cast<const uint4*>(row + id0));
      unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        z[2 * q] = to_f32<D>((typename D::raw)(w[q] & 0xFFFFu));
        z[2 * q + 1] = to_f32<D>((typename D::raw)(w[q] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      z[v] = (id0 + v < vocab) ? to_f32<D>(row[id0 + v]) : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------
// Block-wide helpers. Each starts and ends with a barrier, so its shared
// scratch can be reused at once.

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LOGITD_FULL, v, o);
  return v;
}

// Exclusive prefix sum over threads; *total gets the block sum.
__device__ double block_excl_sum_d(double x, double* total, double* sh) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  double incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    double y = __shfl_up_sync(LOGITD_FULL, incl, o);
    if (lane >= (unsigned)o) incl += y;
  }
  double excl = __shfl_up_sync(LOGITD_FULL, incl, 1);
  if (lane == 0) excl = 0.0;
  if (lane == 31) sh[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double w = lane < LOGITD_WARPS ? sh[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      double y = __shfl_up_sync(LOGITD_FULL, w, o);
      if (lane >= (unsigned)o) w += y;
    }
    if (lane < LOGITD_WARPS) sh[LOGITD_WARPS + lane] = w;
  }
  __syncthreads();
  double base = warp == 0 ? 0.0 : sh[LOGITD_WARPS + warp - 1];
  *total = sh[2 * LOGITD_WARPS - 1];
  __syncthreads();
  return base + excl;
}

// Exclusive prefix max over threads (-inf for thread 0).
__device__ double block_excl_max_d(double x, double* sh) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  double incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    double y = __shfl_up_sync(LOGITD_FULL, incl, o);
    if (lane >= (unsigned)o) incl = fmax(incl, y);
  }
  double excl = __shfl_up_sync(LOGITD_FULL, incl, 1);
  if (lane == 0) excl = -INFINITY;
  if (lane == 31) sh[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double w = lane < LOGITD_WARPS ? sh[lane] : -INFINITY;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      double y = __shfl_up_sync(LOGITD_FULL, w, o);
      if (lane >= (unsigned)o) w = fmax(w, y);
    }
    if (lane < LOGITD_WARPS) sh[LOGITD_WARPS + lane] = w;
  }
  __syncthreads();
  double base = warp == 0 ? -INFINITY : sh[LOGITD_WARPS + warp - 1];
  __syncthreads();
  return fmax(base, excl);
}

// Exclusive prefix sum of unsigned counts; *total gets the block sum.
__device__ unsigned block_excl_sum_u(unsigned x, unsigned* total, unsigned* sh) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  unsigned incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    unsigned y = __shfl_up_sync(LOGITD_FULL, incl, o);
    if (lane >= (unsigned)o) incl += y;
  }
  if (lane == 31) sh[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    unsigned w = lane < LOGITD_WARPS ? sh[lane] : 0u;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      unsigned y = __shfl_up_sync(LOGITD_FULL, w, o);
      if (lane >= (unsigned)o) w += y;
    }
    if (lane < LOGITD_WARPS) sh[LOGITD_WARPS + lane] = w;
  }
  __syncthreads();
  unsigned base = warp == 0 ? 0u : sh[LOGITD_WARPS + warp - 1];
  *total = sh[2 * LOGITD_WARPS - 1];
  __syncthreads();
  return base + incl - x;
}

__device__ float block_max_f(float x, float* sh) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float y = __shfl_xor_sync(LOGITD_FULL, x, o);
    x = y > x ? y : x;
  }
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  float r = sh[0];
  for (int w = 1; w < LOGITD_WARPS; ++w) r = sh[w] > r ? sh[w] : r;
  __syncthreads();
  return r;
}

__device__ int block_max_i(int x, int* sh) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(LOGITD_FULL, x, o));
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  int r = sh[0];
  for (int w = 1; w < LOGITD_WARPS; ++w) r = max(r, sh[w]);
  __syncthreads();
  return r;
}

// First j in [lo, hi) with thr[j] - a >= x (thr is non-decreasing).
__device__ __forceinline__ unsigned first_at_or_above(const double* thr, unsigned lo, unsigned hi,
                                                      double a, double x) {
  while (lo < hi) {
    unsigned mid = (lo + hi) >> 1;
    if (thr[mid] - a < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

struct RowCtx {
  unsigned vocab;
  unsigned n_tiles;
  bool vec_ok;
  float m;
  double inv_t;
  int t_is_one;
  double ln_sum;
};

// One warp walks tile `tile`, which owns thresholds [j0, j1) (at least one).
template <class D>
__device__ void walk_tile(const typename D::raw* __restrict__ row, const RowCtx& c,
                          const double* tile_end, const double* thr, unsigned tile, unsigned j0,
                          unsigned j1, unsigned* slot_id, unsigned* slot_cnt, float* slot_lp) {
  const unsigned lane = threadIdx.x & 31;
  const unsigned id0 = tile * LOGITD_TILE + lane * 8;
  float z[8];
  load8<D>(row, c.vocab, id0, c.vec_ok, z);
  double e[8];
  double lane_sum = 0.0;
  int last = -1;
#pragma unroll
  for (int v = 0; v < 8; ++v) {
    e[v] = logitd_weight_d(z[v], c.m, c.inv_t, c.t_is_one);
    if (e[v] > 0.0) {
      lane_sum += e[v];
      last = (int)(id0 + v);
    }
  }
  double incl = lane_sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    double y = __shfl_up_sync(LOGITD_FULL, incl, o);
    if (lane >= (unsigned)o) incl += y;
  }
  double excl = __shfl_up_sync(LOGITD_FULL, incl, 1);
  if (lane == 0) excl = 0.0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(LOGITD_FULL, last, o));
  // Raw ends of this lane's ids, relative to the tile start; the tile's last
  // positive id ends at +inf.
  double lane_max = -INFINITY;
  {
    double run = 0.0;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      if (e[v] > 0.0) {
        run += e[v];
        double raw = ((int)(id0 + v) == last) ? INFINITY : excl + run;
        lane_max = fmax(lane_max, raw);
      }
    }
  }
  double pmax = lane_max;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    double y = __shfl_up_sync(LOGITD_FULL, pmax, o);
    if (lane >= (unsigned)o) pmax = fmax(pmax, y);
  }
  double carry = __shfl_up_sync(LOGITD_FULL, pmax, 1);
  if (lane == 0) carry = -INFINITY;
  if (lane_max == -INFINITY) return;  // no positive id in this lane
  double a = tile == 0 ? 0.0 : tile_end[tile - 1];
  if (a == -INFINITY) a = 0.0;
  unsigned j = carry == -INFINITY ? j0 : first_at_or_above(thr, j0, j1, a, carry);
  double cur = carry;
  double run = 0.0;
#pragma unroll
  for (int v = 0; v < 8; ++v) {
    if (e[v] > 0.0) {
      run += e[v];
      double raw = ((int)(id0 + v) == last) ? INFINITY : excl + run;
      cur = fmax(cur, raw);
      unsigned js = j;
      while (j < j1 && thr[j] - a < cur) ++j;
      if (j > js) {
        slot_id[js] = id0 + v;
        slot_cnt[js] = j - js;
        slot_lp[js] = logitd_logprob(z[v], c.m, c.inv_t, c.ln_sum);
      }
    }
  }
}

template <class D>
__device__ void sample_row(const typename D::raw* __restrict__ logits, unsigned vocab,
                           unsigned row_index, const unsigned* __restrict__ keys, unsigned method,
                           unsigned k, double inv_t, int t_is_one, unsigned* cursor,
                           unsigned* out_ids, unsigned* out_counts, float* out_lps,
                           unsigned* meta) {
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ double sh_d[2 * LOGITD_WARPS];
  __shared__ unsigned sh_u[2 * LOGITD_WARPS];
  __shared__ float sh_f[LOGITD_WARPS];
  __shared__ int sh_i[LOGITD_WARPS];
  __shared__ unsigned sh_bad;
  __shared__ unsigned sh_misc[4];
  __shared__ unsigned hist[256];

  const unsigned tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const typename D::raw* row = logits + (size_t)row_index * vocab;
  unsigned* row_meta = meta + (size_t)row_index * META_WORDS;
  RowCtx c;
  c.vocab = vocab;
  c.n_tiles = (vocab + LOGITD_TILE - 1) / LOGITD_TILE;
  c.vec_ok = (((size_t)row) & 15) == 0;
  c.inv_t = inv_t;
  c.t_is_one = t_is_one;

  // ---- pass 1: max, first NaN/+inf, finite count.
  if (tid == 0) sh_bad = 0xFFFFFFFFu;
  float mx = -INFINITY;
  unsigned finite = 0, bad = 0xFFFFFFFFu;
  for (unsigned base = warp; base < c.n_tiles; base += LOGITD_UNROLL * LOGITD_WARPS) {
    float z[LOGITD_UNROLL][8];
#pragma unroll
    for (int u = 0; u < LOGITD_UNROLL; ++u) {
      unsigned t = base + u * LOGITD_WARPS;
      if (t < c.n_tiles) load8<D>(row, vocab, t * LOGITD_TILE + lane * 8, c.vec_ok, z[u]);
    }
#pragma unroll
    for (int u = 0; u < LOGITD_UNROLL; ++u) {
      unsigned t = base + u * LOGITD_WARPS;
      if (t < c.n_tiles) {
#pragma unroll
        for (int v = 0; v < 8; ++v) {
          float x = z[u][v];
          if (isnan(x) || x == INFINITY) bad = min(bad, t * LOGITD_TILE + lane * 8 + v);
          mx = x > mx ? x : mx;
          finite += x > -INFINITY ? 1u : 0u;
        }
      }
    }
  }
  __syncthreads();
  if (bad != 0xFFFFFFFFu) atomicMin(&sh_bad, bad);
  c.m = block_max_f(mx, sh_f);
  unsigned n_finite;
  (void)block_excl_sum_u(finite, &n_finite, sh_u);
  if (sh_bad != 0xFFFFFFFFu || c.m == -INFINITY) {
    if (tid == 0) {
      row_meta[META_START] = 0;
      row_meta[META_LEN] = 0;
      if (sh_bad != 0xFFFFFFFFu) {
        row_meta[META_STATUS] = STATUS_NON_FINITE;
        row_meta[META_ERR_INDEX] = sh_bad;
        row_meta[META_ERR_VALUE] = logitd_f32_bits(to_f32<D>(row[sh_bad]));
      } else {
        row_meta[META_STATUS] = STATUS_ALL_MASKED;
        row_meta[META_ERR_INDEX] = 0;
        row_meta[META_ERR_VALUE] = 0;
      }
      row_meta[META_LSE] = 0;
    }
    return;
  }

  // ---- pass 2: tile sums of e_i, last tile first.
  double* tile_end = reinterpret_cast<double*>(dyn);
  for (unsigned base = warp; base < c.n_tiles; base += LOGITD_UNROLL * LOGITD_WARPS) {
    float z[LOGITD_UNROLL][8];
#pragma unroll
    for (int u = 0; u < LOGITD_UNROLL; ++u) {
      unsigned r = base + u * LOGITD_WARPS;
      if (r < c.n_tiles) {
        unsigned t = c.n_tiles - 1 - r;
        load8<D>(row, vocab, t * LOGITD_TILE + lane * 8, c.vec_ok, z[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < LOGITD_UNROLL; ++u) {
      unsigned r = base + u * LOGITD_WARPS;
      if (r < c.n_tiles) {
        double s = 0.0;
#pragma unroll
        for (int v = 0; v < 8; ++v) s += logitd_weight_d(z[u][v], c.m, inv_t, t_is_one);
        s = warp_sum_d(s);
        if (lane == 0) tile_end[c.n_tiles - 1 - r] = s;
      }
    }
  }
  __syncthreads();

  // ---- scan: tile ends (non-decreasing, the last positive tile at +inf), S.
  double total;
  {
    const unsigned per = (c.n_tiles + LOGITD_THREADS - 1) / LOGITD_THREADS;
    const unsigned t0 = min(tid * per, c.n_tiles), t1 = min(t0 + per, c.n_tiles);
    double chunk = 0.0;
    int last_pos = -1;
    for (unsigned t = t0; t < t1; ++t) {
      double b = tile_end[t];
      if (b > 0.0) {
        chunk += b;
        last_pos = (int)t;
      }
    }
    double base = block_excl_sum_d(chunk, &total, sh_d);
    int last = block_max_i(last_pos, sh_i);
    double run = base, run_max = -INFINITY;
    for (unsigned t = t0; t < t1; ++t) {
      double b = tile_end[t];
      if (b > 0.0) {
        run += b;
        run_max = fmax(run_max, (int)t == last ? INFINITY : run);
      }
    }
    double carry = block_excl_max_d(run_max, sh_d);
    run = base;
    double cur = carry;
    for (unsigned t = t0; t < t1; ++t) {
      double b = tile_end[t];
      if (b > 0.0) {
        run += b;
        cur = fmax(cur, (int)t == last ? INFINITY : run);
      }
      tile_end[t] = cur;
    }
  }
  c.ln_sum = log(total);
  const float lse = logitd_lse(c.m, inv_t, c.ln_sum);
  __syncthreads();

  if (method == METHOD_SAMPLE) {
    double* thr = tile_end + c.n_tiles;                              // k + 1
    unsigned* slot_id = reinterpret_cast<unsigned*>(thr + (k + 1));  // k
    unsigned* slot_cnt = slot_id + k;                                // k
    float* slot_lp = reinterpret_cast<float*>(slot_cnt + k);         // k
    const unsigned seed_lo = keys[4 * row_index], seed_hi = keys[4 * row_index + 1];
    const unsigned sequence = keys[4 * row_index + 2], position = keys[4 * row_index + 3];
    // E_j = -ln u_j, four draws per Philox block.
    const unsigned blocks = (k + 1 + 3) / 4;
    for (unsigned b = tid; b < blocks; b += LOGITD_THREADS) {
      uint32_t ctr[4] = {b, position, sequence, 0u};
      uint32_t w[4];
      logitd_philox4x32_10(ctr, seed_lo, seed_hi, w);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        unsigned j = 4 * b + q;
        if (j <= k) thr[j] = -log(logitd_uniform(w[q]));
      }
    }
    for (unsigned j = tid; j < k; j += LOGITD_THREADS) slot_id[j] = LOGITD_EMPTY;
    __syncthreads();
    // G_j = E_0 + ... + E_j (non-decreasing), then t_j = G_j * S / G_k.
    {
      const unsigned per = (k + 1 + LOGITD_THREADS - 1) / LOGITD_THREADS;
      const unsigned s0 = min(tid * per, k + 1), s1 = min(s0 + per, k + 1);
      double chunk = 0.0;
      for (unsigned j = s0; j < s1; ++j) chunk += thr[j];
      double gtotal;
      double base = block_excl_sum_d(chunk, &gtotal, sh_d);
      double run = base;
      for (unsigned j = s0; j < s1; ++j) run += thr[j];
      double carry = block_excl_max_d(s1 > s0 ? run : -INFINITY, sh_d);
      run = base;
      for (unsigned j = s0; j < s1; ++j) {
        run += thr[j];
        thr[j] = fmax(carry, run);
      }
    }
    __syncthreads();
    const double scale = total / thr[k];
    __syncthreads();
    for (unsigned j = tid; j < k; j += LOGITD_THREADS) thr[j] *= scale;
    __syncthreads();

    // Tiles with thresholds, 32 at a time per warp, each walked by the warp.
    for (unsigned g = warp; g * 32 < c.n_tiles; g += LOGITD_WARPS) {
      const unsigned t = g * 32 + lane;
      unsigned j0 = 0, j1 = 0;
      if (t < c.n_tiles) {
        j0 = t == 0 ? 0u : first_at_or_above(thr, 0, k, 0.0, tile_end[t - 1]);
        j1 = first_at_or_above(thr, 0, k, 0.0, tile_end[t]);
      }
      unsigned todo = __ballot_sync(LOGITD_FULL, j1 > j0);
      while (todo) {
        const int src = __ffs(todo) - 1;
        todo &= todo - 1;
        const unsigned tt = __shfl_sync(LOGITD_FULL, t, src);
        const unsigned a0 = __shfl_sync(LOGITD_FULL, j0, src);
        const unsigned a1 = __shfl_sync(LOGITD_FULL, j1, src);
        walk_tile<D>(row, c, tile_end, thr, tt, a0, a1, slot_id, slot_cnt, slot_lp);
      }
    }
    __syncthreads();

    // Compact the slots in order and reserve the row's output.
    const unsigned per = (k + LOGITD_THREADS - 1) / LOGITD_THREADS;
    const unsigned s0 = min(tid * per, k), s1 = min(s0 + per, k);
    unsigned mine = 0;
    for (unsigned j = s0; j < s1; ++j) mine += slot_id[j] != LOGITD_EMPTY ? 1u : 0u;
    unsigned n;
    unsigned pos = block_excl_sum_u(mine, &n, sh_u);
    if (tid == 0) sh_misc[0] = atomicAdd(cursor, n);
    __syncthreads();
    const unsigned start = sh_misc[0];
    for (unsigned j = s0; j < s1; ++j) {
      if (slot_id[j] != LOGITD_EMPTY) {
        out_ids[start + pos] = slot_id[j];
        out_counts[start + pos] = slot_cnt[j];
        out_lps[start + pos] = slot_lp[j];
        ++pos;
      }
    }
    if (tid == 0) {
      row_meta[META_START] = start;
      row_meta[META_LEN] = n;
      row_meta[META_STATUS] = STATUS_OK;
      row_meta[META_ERR_INDEX] = 0;
      row_meta[META_ERR_VALUE] = 0;
      row_meta[META_LSE] = logitd_f32_bits(lse);
    }
    return;
  }

  // ---- top-k: radix select of the k-th largest finite key.
  const unsigned keff = min(k, n_finite);
  unsigned prefix = 0, mask = 0, remaining = keff;
  for (int shift = KeyBits<D>::value - 8; shift >= 0; shift -= 8) {
    for (unsigned i = tid; i < 256; i += LOGITD_THREADS) hist[i] = 0;
    __syncthreads();
    for (unsigned t = warp; t < c.n_tiles; t += LOGITD_WARPS) {
      float z[8];
      load8<D>(row, vocab, t * LOGITD_TILE + lane * 8, c.vec_ok, z);
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        // Warp-aggregated: the lanes counting into the same bin add once
        // (logits crowd into a few bins, and same-address shared atomics
        // serialise).
        unsigned key = key_of<D>(z[v]);
        const bool counted = z[v] > -INFINITY && (key & mask) == prefix;
        const unsigned bin = (key >> shift) & 255u;
        const unsigned active = __ballot_sync(LOGITD_FULL, counted);
        if (counted) {
          const unsigned peers = __match_any_sync(active, bin);
          if (lane == (unsigned)(__ffs(peers) - 1)) atomicAdd(&hist[bin], (unsigned)__popc(peers));
        }
      }
    }
    __syncthreads();
    if (tid == 0) {
      unsigned cum = 0;
      for (int b = 255; b >= 0; --b) {
        unsigned h = hist[b];
        if (cum + h >= remaining) {
          sh_misc[1] = (unsigned)b;
          sh_misc[2] = remaining - cum;
          break;
        }
        cum += h;
      }
    }
    __syncthreads();
    prefix |= sh_misc[1] << shift;
    mask |= 255u << shift;
    remaining = sh_misc[2];
    __syncthreads();
  }
  // ids with key > prefix, and the first `remaining` ids with key == prefix.
  if (tid == 0) sh_misc[0] = atomicAdd(cursor, keff);
  __syncthreads();
  const unsigned start = sh_misc[0];
  unsigned eq_before = 0, out_before = 0;
  for (unsigned chunk = 0; chunk < vocab && out_before < keff;
       chunk += LOGITD_THREADS * 8) {
    const unsigned id0 = chunk + tid * 8;
    float z[8];
    if (id0 < vocab) {
      load8<D>(row, vocab, id0, c.vec_ok, z);
    } else {
#pragma unroll
      for (int v = 0; v < 8; ++v) z[v] = -INFINITY;
    }
    unsigned gt = 0, eq = 0;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      if (z[v] > -INFINITY) {
        unsigned key = key_of<D>(z[v]);
        if (key > prefix) gt |= 1u << v;
        if (key == prefix) eq |= 1u << v;
      }
    }
    unsigned eq_total;
    unsigned rank = eq_before + block_excl_sum_u(__popc(eq), &eq_total, sh_u);
    unsigned sel = gt;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      if (eq & (1u << v)) {
        if (rank < remaining) sel |= 1u << v;
        ++rank;
      }
    }
    unsigned sel_total;
    unsigned pos = out_before + block_excl_sum_u(__popc(sel), &sel_total, sh_u);
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      if (sel & (1u << v)) {
        out_ids[start + pos] = id0 + v;
        out_counts[start + pos] = 1;
        out_lps[start + pos] = logitd_logprob(z[v], c.m, inv_t, c.ln_sum);
        ++pos;
      }
    }
    eq_before += eq_total;
    out_before += sel_total;
  }
  if (tid == 0) {
    row_meta[META_START] = start;
    row_meta[META_LEN] = keff;
    row_meta[META_STATUS] = STATUS_OK;
    row_meta[META_ERR_INDEX] = 0;
    row_meta[META_ERR_VALUE] = 0;
    row_meta[META_LSE] = logitd_f32_bits(lse);
  }
}

#define LOGITD_ENTRY(NAME, D)                                                                    \
  extern "C" __global__ void __launch_bounds__(LOGITD_THREADS, LOGITD_MIN_BLOCKS)                                \
      NAME(const D::raw* __restrict__ logits, unsigned vocab, const unsigned* __restrict__ keys, \
           unsigned method, unsigned k, double inv_t, int t_is_one, unsigned* cursor,           \
           unsigned* out_ids, unsigned* out_counts, float* out_lps, unsigned* meta) {           \
    sample_row<D>(logits, vocab, blockIdx.x, keys, method, k, inv_t, t_is_one, cursor, out_ids,  \
                  out_counts, out_lps, meta);                                                    \
  }

LOGITD_ENTRY(logitd_sample_f32, DF32)
LOGITD_ENTRY(logitd_sample_bf16, DBF16)
LOGITD_ENTRY(logitd_sample_f16, DF16)
