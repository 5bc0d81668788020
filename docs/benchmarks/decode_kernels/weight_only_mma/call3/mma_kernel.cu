// Scratch (session 5): int4 weight-only GEMV for 1-8 rows on tensor cores (mma.m16n8k16),
// weights pre-shuffled into the A-fragment order (see to_mma_layout in mma_bench.py).
__device__ __forceinline__ void mma_word(float* acc, unsigned int w, unsigned int b0, unsigned int b1) {
  unsigned int a0, a1, a2, a3, w2 = w >> 8;
  asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xEA;" : "=r"(a0) : "r"(w));
  asm("lop3.b32 %0, %1, 0x00F000F0, 0x64006400, 0xEA;" : "=r"(a1) : "r"(w));
  asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xEA;" : "=r"(a2) : "r"(w2));
  asm("lop3.b32 %0, %1, 0x00F000F0, 0x64006400, 0xEA;" : "=r"(a3) : "r"(w2));
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a0) : "r"(0x64086408u));
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a2) : "r"(0x64086408u));
  asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a1) : "r"(0x2C002C00u), "r"(0xD480D480u));
  asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a3) : "r"(0x2C002C00u), "r"(0xD480D480u));
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
extern "C" __global__ void __launch_bounds__(WARPS * 32)
int4_gemv_mma(const uint4* __restrict__ weight, const uint4* __restrict__ x, const float* __restrict__ scales,
              const unsigned short* __restrict__ bias, unsigned short* __restrict__ out, int rows, int n, int k,
              int has_bias) {
  __shared__ float partial[WARPS][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int tile = blockIdx.x;
  const int chunks = k >> 6;
  const uint4* w = weight + (size_t)tile * chunks * 32 + lane;
  const bool has_row = g < rows;
  const uint4* xr = x + (size_t)(has_row ? g : 0) * (k >> 3) + 2 * c;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const uint4 zero = make_uint4(0, 0, 0, 0);
#define LOAD_CHUNKS(ws, xa, xb, base)                                   \
  _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {                  \
    const int q = (base) + u;                                           \
    const bool ok = q < chunks;                                         \
    ws[u] = ok ? __ldg(w + (size_t)q * 32) : zero;                      \
    xa[u] = (ok && has_row) ? __ldg(xr + q * 8) : zero;                 \
    xb[u] = (ok && has_row) ? __ldg(xr + q * 8 + 1) : zero;             \
  }
#define MMA_CHUNKS(ws, xa, xb)                                          \
  _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {                  \
    mma_word(acc, ws[u].x, xa[u].x, xa[u].y);                           \
    mma_word(acc, ws[u].y, xa[u].z, xa[u].w);                           \
    mma_word(acc, ws[u].z, xb[u].x, xb[u].y);                           \
    mma_word(acc, ws[u].w, xb[u].z, xb[u].w);                           \
  }
#if PIPE
  uint4 ws[UNROLL], xa[UNROLL], xb[UNROLL], wn[UNROLL], xan[UNROLL], xbn[UNROLL];
  LOAD_CHUNKS(ws, xa, xb, warp * UNROLL)
  for (int base = warp * UNROLL; base < chunks; base += WARPS * UNROLL) {
    LOAD_CHUNKS(wn, xan, xbn, base + WARPS * UNROLL)
    MMA_CHUNKS(ws, xa, xb)
    _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) { ws[u] = wn[u]; xa[u] = xan[u]; xb[u] = xbn[u]; }
  }
#else
  for (int base = warp * UNROLL; base < chunks; base += WARPS * UNROLL) {
    uint4 ws[UNROLL], xa[UNROLL], xb[UNROLL];
    LOAD_CHUNKS(ws, xa, xb, base)
    MMA_CHUNKS(ws, xa, xb)
  }
#endif
  if (WARPS > 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][i][lane] = acc[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int other = 1; other < WARPS; ++other)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += partial[other][i][lane];
  }
  const int col0 = tile * 16 + g, col1 = col0 + 8;
  const float scale0 = scales[col0], scale1 = scales[col1];
  const float bias0 = has_bias ? half_to_float(bias[col0]) : 0.f, bias1 = has_bias ? half_to_float(bias[col1]) : 0.f;
  const int m0 = 2 * c, m1 = 2 * c + 1;
  if (m0 < rows) {
    out[(size_t)m0 * n + col0] = float_to_half(acc[0] * scale0 + bias0);
    out[(size_t)m0 * n + col1] = float_to_half(acc[2] * scale1 + bias1);
  }
  if (m1 < rows) {
    out[(size_t)m1 * n + col0] = float_to_half(acc[1] * scale0 + bias0);
    out[(size_t)m1 * n + col1] = float_to_half(acc[3] * scale1 + bias1);
  }
}
