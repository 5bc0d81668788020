// Weight-only GEMM (int8 or int4 weights, one scale per output channel) for 1-16 fp16 rows on tensor
// cores (mma.sync m16n8k16, fp32 accumulation). Compiled at load with NVRTC
// (glm_engine/kernels/weight_only_mma.py); BITS, WARPS, UNROLL, PIPE, ROW_BLOCKS and PDL (programmatic
// dependent launch, sm_90 and later) are defined there.
//
// Weights are stored in the "mma layout" that weight_only_mma.shuffle writes: for each tile of 16 output
// channels and each chunk of 64 input channels, 32 lanes x BITS int32 words, lane l = 4g + c holding the
// 8 weights of its A fragment for each 16-wide step j of the chunk (rows g and g + 8, input channels
// 16c + 4j + 0..3 of the chunk) as unsigned v + 2^(BITS-1): int4 in word j, nibbles ordered so that two
// lop3 per half of the word make the four fp16 pairs; int8 in words 2j (row g) and 2j + 1 (row g + 8),
// bytes in channel order. The input channels of a chunk are permuted alike on both operands, so x is
// read 16 consecutive values per lane. A warp reads BITS x 128 contiguous bytes a chunk.
//
// BITS 16 takes fp16 weights as they are, row-major [n, k]: lane 4g + c reads input channels 16c..16c+15 of
// the chunk from rows g and g + 8 of its tile, which are its A fragments under the same permutation of the
// chunk's input channels; no scales.
//
// TILES 2 (weight_only_mma.gemm(..., swiglu=True)) takes gate tile t and up tile t + n / 32 of the fused
// up projection in one block and writes silu(gate) * up: the SwiGLU kernel after it is not needed.

// FP8 1 (with BITS 8) takes FP8 E4M3 weights row-major [n, k], as FP8 prefill GEMMs read them: lane 4g + c
// reads input channels 16c..16c+15 of the chunk from rows g and g + 8 (16 bytes each), turns each byte pair into
// an fp16 pair with one cvt (compute capability 8.9 and later), and the scales apply per channel as for int8.

#ifndef TILES
#define TILES 1
#endif
#ifndef FP8
#define FP8 0
#endif

// acc += A B: A the 16 x 16 fp16 fragment pairs a0-a3 (rows g / g + 8, inputs 2c, 2c + 1 / + 8), B the 16 x 8 ones
__device__ __forceinline__ void mma_halves(float* acc, unsigned int a0, unsigned int a1, unsigned int a2,
                                           unsigned int a3, unsigned int b0, unsigned int b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_word(float* acc, unsigned int word, unsigned int b0, unsigned int b1) {
  // nibbles 0/4 -> a0 (rows g, channels +0/+1), 1/5 -> a1 (rows g+8), 2/6 -> a2 (g, +2/+3), 3/7 -> a3
  unsigned int a0, a1, a2, a3, high = word >> 8;
  // (w & mask) | 0x6400: fp16 1024 + u in the low nibble's lanes, 1024 + 16u in the next ones
  asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xEA;" : "=r"(a0) : "r"(word));
  asm("lop3.b32 %0, %1, 0x00F000F0, 0x64006400, 0xEA;" : "=r"(a1) : "r"(word));
  asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xEA;" : "=r"(a2) : "r"(high));
  asm("lop3.b32 %0, %1, 0x00F000F0, 0x64006400, 0xEA;" : "=r"(a3) : "r"(high));
  // exact: (1024 + u) - 1032 = v; (1024 + 16u) / 16 - 72 = v
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a0) : "r"(0x64086408u));
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a2) : "r"(0x64086408u));
  asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a1) : "r"(0x2C002C00u), "r"(0xD480D480u));
  asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a3) : "r"(0x2C002C00u), "r"(0xD480D480u));
  mma_halves(acc, a0, a1, a2, a3, b0, b1);
}

__device__ __forceinline__ void mma_words8(float* acc, unsigned int row_g, unsigned int row_g8, unsigned int b0,
                                           unsigned int b1) {
  // bytes u (v + 128) as the low byte of fp16 1024 + u; (1024 + u) - 1152 = v, exact
  unsigned int a0, a1, a2, a3;
  asm("prmt.b32 %0, %1, %2, 0x5140;" : "=r"(a0) : "r"(row_g), "r"(0x64646464u));
  asm("prmt.b32 %0, %1, %2, 0x5140;" : "=r"(a1) : "r"(row_g8), "r"(0x64646464u));
  asm("prmt.b32 %0, %1, %2, 0x5342;" : "=r"(a2) : "r"(row_g), "r"(0x64646464u));
  asm("prmt.b32 %0, %1, %2, 0x5342;" : "=r"(a3) : "r"(row_g8), "r"(0x64646464u));
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a0) : "r"(0x64806480u));
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a1) : "r"(0x64806480u));
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a2) : "r"(0x64806480u));
  asm("sub.f16x2 %0, %0, %1;" : "+r"(a3) : "r"(0x64806480u));
  mma_halves(acc, a0, a1, a2, a3, b0, b1);
}

__device__ __forceinline__ unsigned int e4m3_pair_to_halves(unsigned int pair) {  // bytes 0-1 of `pair`
  unsigned int halves;
#if FP8
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"((unsigned short)(pair & 0xFFFF)));
#else
  halves = pair;  // (unused: the cvt needs compute capability 8.9)
#endif
  return halves;
}

__device__ __forceinline__ void mma_words_fp8(float* acc, unsigned int row_g, unsigned int row_g8, unsigned int b0,
                                              unsigned int b1) {
  // bytes 0-1 of a row word: input channels +0/+1 (a0, a1); bytes 2-3: +2/+3 (a2, a3)
  mma_halves(acc, e4m3_pair_to_halves(row_g), e4m3_pair_to_halves(row_g8), e4m3_pair_to_halves(row_g >> 16),
             e4m3_pair_to_halves(row_g8 >> 16), b0, b1);
}

__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

#define VECTORS (BITS / 4)  // 16-byte loads of weights a lane a chunk

struct Chunk {  // one lane's share of one 64-channel chunk: its weight words per tile, 16 inputs per row block
  uint4 words[TILES][VECTORS];
  uint4 x[ROW_BLOCKS][2];
};

// row_words: uint4 a row-major weight row (BITS 16: vectors 0-1 from row g, 2-3 from row g + 8; FP8: 0 and 1)
__device__ __forceinline__ void load_words(Chunk& chunk, const uint4* const* weight, int q, int chunks,
                                           int row_words) {
#pragma unroll
  for (int t = 0; t < TILES; ++t)
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
#if BITS == 16
      const size_t offset = (size_t)(v >> 1) * 8 * row_words + (size_t)q * 8 + (v & 1);
#elif FP8  // vector 0 from row g, 1 from row g + 8
      const size_t offset = (size_t)v * 8 * row_words + (size_t)q * 4;
#else
      const size_t offset = (size_t)q * 32 * VECTORS + v;
#endif
      chunk.words[t][v] = q < chunks ? __ldg(weight[t] + offset) : make_uint4(0, 0, 0, 0);
    }
}

__device__ __forceinline__ void load_inputs(Chunk& chunk, const uint4* const* x_rows, const bool* has_row, int q,
                                            int chunks) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int b = 0; b < ROW_BLOCKS; ++b) {
    chunk.x[b][0] = q < chunks && has_row[b] ? __ldg(x_rows[b] + q * 8) : zero;
    chunk.x[b][1] = q < chunks && has_row[b] ? __ldg(x_rows[b] + q * 8 + 1) : zero;
  }
}

__device__ __forceinline__ void mma_chunk(float (*acc)[ROW_BLOCKS][4], const Chunk& chunk) {
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
    const unsigned int* words = reinterpret_cast<const unsigned int*>(chunk.words[t]);
#pragma unroll
    for (int b = 0; b < ROW_BLOCKS; ++b) {
      const unsigned int* x = reinterpret_cast<const unsigned int*>(chunk.x[b]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // step j: inputs 16c + 4j + 0..3 as two fp16 pairs
#if BITS == 4
        mma_word(acc[t][b], words[j], x[2 * j], x[2 * j + 1]);
#elif FP8  // row g's words 0-3, row g + 8's words 4-7
        mma_words_fp8(acc[t][b], words[j], words[4 + j], x[2 * j], x[2 * j + 1]);
#elif BITS == 8
        mma_words8(acc[t][b], words[2 * j], words[2 * j + 1], x[2 * j], x[2 * j + 1]);
#else  // fp16 pairs: row g's words 0-7, row g + 8's words 8-15
        mma_halves(acc[t][b], words[2 * j], words[8 + 2 * j], words[2 * j + 1], words[8 + 2 * j + 1], x[2 * j],
                   x[2 * j + 1]);
#endif
      }
    }
  }
}

__device__ __forceinline__ float silu_times(float gate, float up) {  // on fp16-rounded inputs, as swiglu.py
  gate = half_to_float(float_to_half(gate));
  return gate / (1.f + __expf(-gate)) * half_to_float(float_to_half(up));
}

// out[rows, n] = x[rows, k] @ W^T * scales (+ bias), fp16 (scales null: none). One block per 16 output
// channels (TILES 2: per 16 gate and 16 up channels, out[rows, n / 2] = silu(gate) * up); its warps split the
// chunks (UNROLL at a time; PIPE loads the next ones before using these) and add their partial sums in shared
// memory. x rows must be 16-byte aligned; n % (16 * TILES) == 0, k % 64 == 0.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
weight_only_mma_gemm(const uint4* __restrict__ weight, const uint4* __restrict__ x, const float* __restrict__ scales,
              const unsigned short* __restrict__ bias, unsigned short* __restrict__ out, int rows, int n, int k,
              int has_bias) {
  __shared__ float partial[WARPS > 1 ? WARPS : 1][TILES][ROW_BLOCKS][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int chunks = k >> 6;
  const int row_words = k >> (FP8 ? 4 : 3);  // uint4 a row-major weight row (fp16 or FP8)
  const uint4* lane_weight[TILES];
#pragma unroll
  for (int t = 0; t < TILES; ++t)  // gate tile t = blockIdx.x, up tile t + gridDim.x
#if BITS == 16
    lane_weight[t] = weight + ((size_t)(blockIdx.x + t * gridDim.x) * 16 + g) * (k >> 3) + 2 * c;
#elif FP8
    lane_weight[t] = weight + ((size_t)(blockIdx.x + t * gridDim.x) * 16 + g) * (k >> 4) + c;
#else
    lane_weight[t] = weight + ((size_t)(blockIdx.x + t * gridDim.x) * chunks * 32 + lane) * VECTORS;
#endif
  const uint4* x_rows[ROW_BLOCKS];
  bool has_row[ROW_BLOCKS];
#pragma unroll
  for (int b = 0; b < ROW_BLOCKS; ++b) {  // lane g feeds x row 8b + g as column g of the B fragment
    has_row[b] = 8 * b + g < rows;
    x_rows[b] = x + (size_t)(has_row[b] ? 8 * b + g : 0) * (k >> 3) + 2 * c;
  }
  float acc[TILES][ROW_BLOCKS][4] = {};
  const int stride = WARPS * UNROLL;
  Chunk current[UNROLL];
  // The weights never change: their first loads go out before the wait for the kernel ahead (PDL), x after it.
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) load_words(current[u], lane_weight, warp * UNROLL + u, chunks, row_words);
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) load_inputs(current[u], x_rows, has_row, warp * UNROLL + u, chunks);
  for (int first = warp * UNROLL; first < chunks; first += stride) {
#if PIPE  // the next chunks' loads in flight while these multiply
    Chunk next[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      load_words(next[u], lane_weight, first + stride + u, chunks, row_words);
      load_inputs(next[u], x_rows, has_row, first + stride + u, chunks);
    }
#endif
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) mma_chunk(acc, current[u]);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#if PIPE
      current[u] = next[u];
#else
      load_words(current[u], lane_weight, first + stride + u, chunks, row_words);
      load_inputs(current[u], x_rows, has_row, first + stride + u, chunks);
#endif
    }
  }
  if (WARPS > 1) {
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
      for (int b = 0; b < ROW_BLOCKS; ++b)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][t][b][i][lane] = acc[t][b][i];
    __syncthreads();
    if (warp != 0) return;
    for (int other = 1; other < WARPS; ++other)
#pragma unroll
      for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int b = 0; b < ROW_BLOCKS; ++b)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[t][b][i] += partial[other][t][b][i][lane];
  }
  // acc[t][b]: {C[g][2c], C[g][2c+1], C[g+8][2c], C[g+8][2c+1]}, C[channel][row] of tile t and row block b
  float scale[TILES][2], shift[TILES][2];
#pragma unroll
  for (int t = 0; t < TILES; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int channel = (blockIdx.x + t * gridDim.x) * 16 + g + 8 * h;
      scale[t][h] = scales != nullptr ? scales[channel] : 1.f;
      shift[t][h] = has_bias ? half_to_float(bias[channel]) : 0.f;
    }
  const int width = n / TILES;
#pragma unroll
  for (int b = 0; b < ROW_BLOCKS; ++b) {
#pragma unroll
    for (int odd = 0; odd < 2; ++odd) {
      const int row = 8 * b + 2 * c + odd;
      if (row >= rows) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float first = acc[0][b][2 * h + odd] * scale[0][h] + shift[0][h];
#if TILES == 2
        const float value = silu_times(first, acc[1][b][2 * h + odd] * scale[1][h] + shift[1][h]);
#else
        const float value = first;
#endif
        out[(size_t)row * width + blockIdx.x * 16 + g + 8 * h] = float_to_half(value);
      }
    }
  }
}

// The dense fp16 weight [n, k] (value times its channel's scale) of mma-layout words, one thread a word.
extern "C" __global__ void weight_only_mma_dequantize(const unsigned int* __restrict__ weight,
                                                      const float* __restrict__ scales,
                                                      unsigned short* __restrict__ out, int n, int k) {
  const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int chunks = k >> 6;
  if (index >= (long long)n * chunks * 2 * BITS) return;  // 32 lanes x BITS words a 16-row tile and chunk
  const unsigned int word = weight[index];
#if BITS == 4
  const int j = index & 3, lane = (index >> 2) & 31;
  const long long tile_chunk = index >> 7;
#else
  const int j = (index >> 1) & 3, upper_word = index & 1, lane = (index >> 3) & 31;
  const long long tile_chunk = index >> 8;
#endif
  const int chunk = tile_chunk % chunks, tile = tile_chunk / chunks;
  const int channel = tile * 16 + (lane >> 2), first = chunk * 64 + 16 * (lane & 3) + 4 * j;
#pragma unroll
  for (int upper = 0; upper < 2; ++upper) {  // rows g and g + 8
#if BITS == 8
    if (upper != upper_word) continue;  // an int8 word holds one row's 4 values
#endif
    const int row = channel + 8 * upper;
    const float scale = scales[row];
    unsigned short* destination = out + (size_t)row * k + first;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#if BITS == 4  // input channels +0, +1, +2, +3 sit in nibbles 0, 4, 2, 6 (+1 for row g + 8)
      const int nibbles[4] = {0, 4, 2, 6};
      const int value = (int)((word >> (4 * (nibbles[i] + upper))) & 15) - 8;
#else
      const int value = (int)((word >> (8 * i)) & 255) - 128;
#endif
      destination[i] = float_to_half(value * scale);
    }
  }
}
