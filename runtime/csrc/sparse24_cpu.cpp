// mrp::sparse24_linear: y = x W^T + b for a 2:4 weight W stored compressed, AVX2 + FMA (+ F16C), CPU.
//
// Layout (built by runtime/cpu_sparse.py `pack` / `pack_bitmask`): output rows in blocks of 8 (the last block
// zero-padded), inputs in groups of 4 (g covers inputs 4g..4g+3); per block b and group g:
//   values[b, g, 0:8]   the 8 rows' first kept values   (row r of the block in lane r)
//   values[b, g, 8:16]  the 8 rows' second kept values
//   positions[b, g]     int32, nibble r (bits 4r..4r+3) = p1 | p2 << 2, the two kept inputs of row r in 0..3
// values are float32, float16 or bfloat16 (products and sums in float32). An fp32 (block, group) is 64 + 4 bytes
// where the dense weight is 128: the kernel streams 0.53x the bytes of dense F.linear (0.28x for 16-bit values).
//
// Kernel: xb = the 4 inputs of group g in both 128-bit lanes; _mm256_permutevar_ps(xb, idx) takes lane r's input
// from the low 2 bits of idx's lane r, so idx = nibbles >> (4r) selects the first kept inputs and idx >> 2 the
// second: two permutes and two FMAs per (token, group), no gathers. Up to 4 tokens share each loaded
// (values, positions); threads split the row blocks (at::parallel_for, OpenMP: build with -fopenmp).
//
// Many token rows (prefill) are compute-bound, not memory-bound: the same kernel runs cache-blocked (a tile of
// token rows x an input chunk of x in L2, a block's weight chunk in L1). It does half the FMAs of dense plus as
// many permutes, so it stays at or above dense MKL on AVX2-width FMA units. A second path (decompress to a dense
// float32 scratch, then the dense GEMM) is kept behind a row-count threshold, off by default: see kDenseFromRows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kRows = 8;        // output rows per block (one __m256 of accumulators)
// Token rows sharing one pass over a block's weights, each with two accumulators (first / second kept value).
// 4 x 2 accumulators + 7 temporaries fill 15 of AVX2's 16 ymm registers. Measured against 6 and 8 token rows
// with one accumulator each (CPU time, 1 thread, SmolLM2 and 4096x4096 shapes, 1..512 rows): all within noise
// at ~28 G useful MAC/s, so the simplest register-safe choice.
constexpr int kMaxTokens = 4;
// From this many token rows on, decompress the weight into a dense fp32 scratch and call the dense GEMM.
// Measured (benchmarks/cpu_sparse.py --sweep-threshold --threads 1 --clock cpu, AMD EPYC Zen 4 VM, hot weights,
// 1536x576, 576x1536, 4096x4096): the blocked sparse kernel took 1.15-1.67x less time than dense F.linear at every
// row count 16..512 (1.15-1.28x at 512 rows), decompress + GEMM 0.21-0.99x of dense (the decompression and the
// scratch's page faults cost more than the GEMM saves), so the threshold is off. On CPUs whose FMA units are wider than AVX2's (Intel AVX-512 servers) MKL's
// GEMM may win at many rows: re-measure there and enable it with torch.ops.mrp.sparse24_set_dense_threshold.
int64_t kDenseFromRows = int64_t{1} << 62;
constexpr int64_t kPrefetchBytes = 1024;  // how far ahead the dense GEMV prefetches weight rows (the 2:4 kernel: none, it measured slower)
constexpr int64_t kGroupChunk = 256;        // input groups per chunk when blocking for many token rows
constexpr int64_t kTileBytes = 256 << 10;   // x tile (token rows x input chunk, fp32) kept in L2

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
// int8 values carry a per-output-row scale applied once to the row's sum (see block_kernel's `scale`).
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Lanes 0..n-1 set: masked loads / stores of a partial block (the last rows of a layer).
inline __m256i row_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One block of 8 rows x NT token rows over `groups` input groups:
// y[t * ldy + r] = (accumulate ? y[t * ldy + r] : bias[r]) + scale[r] * sum_g ..., for rows r < nrows
// (scale nullptr: 1; the sum over a chunk of groups is linear, so chunks scale their partial sums alike).
template <typename V, int NT>
inline void block_kernel(const V* __restrict vals, const int32_t* __restrict pos, int64_t groups,
                         const float* __restrict x, int64_t ldx, float* __restrict y, int64_t ldy,
                         const float* __restrict bias, const float* __restrict scale, int nrows, bool accumulate) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  // Two accumulators per token (first / second kept value) where registers allow: the FMA latency chain is then
  // one FMA per group, not two (NT = 4: 8 accumulators + 7 temporaries = 15 of the 16 ymm registers).
  constexpr int NA = NT <= 4 ? 2 : 1;
  __m256 acc[NT][NA];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int a = 0; a < NA; ++a) acc[t][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const V* v = vals + g * 16;
    const __m256 v1 = load8(v);
    const __m256 v2 = load8(v + 8);
    const __m256i idx1 = _mm256_srlv_epi32(_mm256_set1_epi32(pos[g]), shifts);
    const __m256i idx2 = _mm256_srli_epi32(idx1, 2);
    const float* xg = x + 4 * g;
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xg + t * ldx));
      acc[t][0] = _mm256_fmadd_ps(v1, _mm256_permutevar_ps(xb, idx1), acc[t][0]);
      acc[t][NA - 1] = _mm256_fmadd_ps(v2, _mm256_permutevar_ps(xb, idx2), acc[t][NA - 1]);
    }
  }
  const __m256i mask = row_mask(nrows);
  const __m256 b = (bias != nullptr && !accumulate) ? _mm256_maskload_ps(bias, mask) : _mm256_setzero_ps();
  const __m256 sc = scale != nullptr ? _mm256_maskload_ps(scale, mask) : _mm256_set1_ps(1.0f);
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    __m256 s = NA == 2 ? _mm256_add_ps(acc[t][0], acc[t][NA - 1]) : acc[t][0];
    if (scale != nullptr) s = _mm256_mul_ps(s, sc);
    // accumulate: add the partial sums of the previous input chunks
    s = _mm256_add_ps(s, accumulate ? _mm256_maskload_ps(y + t * ldy, mask) : b);
    if (nrows == kRows) {
      _mm256_storeu_ps(y + t * ldy, s);
    } else {
      _mm256_maskstore_ps(y + t * ldy, mask, s);
    }
  }
}

// One token row (decode): two groups per iteration into four accumulators, so that four FMA chains (not two) hide
// the FMA latency and the loads of the next groups issue sooner (more of them in flight from one core).
template <typename V>
inline void block_kernel_1(const V* __restrict vals, const int32_t* __restrict pos, int64_t groups,
                           const float* __restrict x, float* __restrict y, const float* __restrict bias,
                           const float* __restrict scale, int nrows, bool accumulate) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const V* v = vals + g * 16;
    const __m256i i0 = _mm256_srlv_epi32(_mm256_set1_epi32(pos[g]), shifts);
    const __m256i i1 = _mm256_srlv_epi32(_mm256_set1_epi32(pos[g + 1]), shifts);
    const __m256 x0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 4 * g));
    const __m256 x1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 4 * g + 4));
    a0 = _mm256_fmadd_ps(load8(v), _mm256_permutevar_ps(x0, i0), a0);
    a1 = _mm256_fmadd_ps(load8(v + 8), _mm256_permutevar_ps(x0, _mm256_srli_epi32(i0, 2)), a1);
    a2 = _mm256_fmadd_ps(load8(v + 16), _mm256_permutevar_ps(x1, i1), a2);
    a3 = _mm256_fmadd_ps(load8(v + 24), _mm256_permutevar_ps(x1, _mm256_srli_epi32(i1, 2)), a3);
  }
  if (g < groups) {
    const V* v = vals + g * 16;
    const __m256i i0 = _mm256_srlv_epi32(_mm256_set1_epi32(pos[g]), shifts);
    const __m256 x0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 4 * g));
    a0 = _mm256_fmadd_ps(load8(v), _mm256_permutevar_ps(x0, i0), a0);
    a1 = _mm256_fmadd_ps(load8(v + 8), _mm256_permutevar_ps(x0, _mm256_srli_epi32(i0, 2)), a1);
  }
  const __m256i mask = row_mask(nrows);
  __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  if (scale != nullptr) s = _mm256_mul_ps(s, _mm256_maskload_ps(scale, mask));
  if (accumulate) {
    s = _mm256_add_ps(s, _mm256_maskload_ps(y, mask));
  } else if (bias != nullptr) {
    s = _mm256_add_ps(s, _mm256_maskload_ps(bias, mask));
  }
  if (nrows == kRows) {
    _mm256_storeu_ps(y, s);
  } else {
    _mm256_maskstore_ps(y, mask, s);
  }
}

template <typename V>
void run_tokens(const V* vals, const int32_t* pos, int64_t groups, const float* x, int64_t ldx, float* y,
                int64_t ldy, const float* bias, const float* scale, int nrows, int64_t tokens, bool acc) {
  int64_t t = 0;
  for (; t + kMaxTokens <= tokens; t += kMaxTokens)
    block_kernel<V, kMaxTokens>(vals, pos, groups, x + t * ldx, ldx, y + t * ldy, ldy, bias, scale, nrows, acc);
  const int64_t rest = tokens - t;
  x += t * ldx;
  y += t * ldy;
  if (rest == 1) block_kernel_1<V>(vals, pos, groups, x, y, bias, scale, nrows, acc);
  if (rest == 2) block_kernel<V, 2>(vals, pos, groups, x, ldx, y, ldy, bias, scale, nrows, acc);
  if (rest == 3) block_kernel<V, 3>(vals, pos, groups, x, ldx, y, ldy, bias, scale, nrows, acc);
  static_assert(kMaxTokens == 4, "the remainder cases above cover 1..3 token rows");
}

// Grain for at::parallel_for over row blocks: a thread gets at least kMinParallelWork (input groups x token rows,
// 68 bytes of fp32 weights per group) so a tiny layer stays on one thread (a fork costs a few microseconds on an
// idle machine; on an oversubscribed one a fork waits for the other thread to be scheduled, which can take
// milliseconds). Set with torch.ops.mrp.sparse24_set_parallel_grain.
int64_t kMinParallelWork = 8192;

int64_t grain_blocks(int64_t groups, int64_t tokens) {
  const int64_t work_per_block = groups * std::max<int64_t>(tokens, 1);
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(work_per_block, 1));
}

void check_layout(const at::Tensor& values, const at::Tensor& positions, int64_t out_features,
                  int64_t in_features, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK(values.device().is_cpu() && positions.device().is_cpu(), "sparse24_linear: CPU tensors only");
  TORCH_CHECK(in_features > 0 && in_features % 4 == 0, "sparse24_linear: in_features must be a positive multiple of 4");
  const int64_t blocks = (out_features + kRows - 1) / kRows, groups = in_features / 4;
  TORCH_CHECK(out_features > 0, "sparse24_linear: out_features must be positive");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == blocks && values.size(1) == groups && values.size(2) == 16,
              "sparse24_linear: values must be [", blocks, ", ", groups, ", 16], got ", values.sizes());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == blocks && positions.size(1) == groups,
              "sparse24_linear: positions must be [", blocks, ", ", groups, "], got ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kInt, "sparse24_linear: positions must be int32");
  TORCH_CHECK(values.is_contiguous() && positions.is_contiguous(), "sparse24_linear: values/positions must be contiguous");
  const auto vt = values.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16 || vt == at::kChar,
              "sparse24_linear: values must be float32, float16, bfloat16 or int8, got ", vt);
  const bool scaled = scales.has_value() && scales->defined();
  TORCH_CHECK(scaled == (vt == at::kChar), "sparse24_linear: int8 values need per-row scales and only they take them");
  if (scaled) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 1 && scales->size(0) == blocks * kRows &&
                    scales->is_contiguous() && scales->device().is_cpu(),
                "sparse24_linear: scales must be contiguous float32 [", blocks * kRows, "], got ", scales->sizes());
  }
}

template <typename V>
void unpack_rows(const V* vals, const int32_t* pos, int64_t groups, const float* scale, float* w,
                 int64_t in_features, int nrows) {
  for (int r = 0; r < nrows; ++r) std::memset(w + r * in_features, 0, sizeof(float) * in_features);
  for (int64_t g = 0; g < groups; ++g) {
    const uint32_t p = static_cast<uint32_t>(pos[g]);
    const V* v = vals + g * 16;
    for (int r = 0; r < nrows; ++r) {
      const uint32_t nib = (p >> (4 * r)) & 15u;
      const float s = scale != nullptr ? scale[r] : 1.0f;
      float* row = w + r * in_features + 4 * g;
      row[nib & 3u] = static_cast<float>(v[r]) * s;
      row[nib >> 2] = static_cast<float>(v[8 + r]) * s;
    }
  }
}

// Run `fn(typed values pointer)` for the values' dtype.
template <typename F>
void by_value_type(const at::Tensor& values, F&& fn) {
  switch (values.scalar_type()) {
    case at::kFloat: fn(values.const_data_ptr<float>()); break;
    case at::kHalf: fn(values.const_data_ptr<c10::Half>()); break;
    case at::kBFloat16: fn(values.const_data_ptr<c10::BFloat16>()); break;
    default: fn(values.const_data_ptr<int8_t>()); break;
  }
}

const float* scales_ptr(const std::optional<at::Tensor>& scales) {
  return scales.has_value() && scales->defined() ? scales->const_data_ptr<float>() : nullptr;
}

// The dense float32 [out_features, in_features] weight (parallel over row blocks).
at::Tensor unpack_dense(const at::Tensor& values, const at::Tensor& positions, int64_t out_features,
                        int64_t in_features, const std::optional<at::Tensor>& scales) {
  const int64_t blocks = values.size(0), groups = values.size(1);
  at::Tensor w = at::empty({out_features, in_features}, values.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  const int32_t* pp = positions.data_ptr<int32_t>();
  const float* sp = scales_ptr(scales);
  by_value_type(values, [&](auto* vp) {
    at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / groups), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int nrows = static_cast<int>(std::min<int64_t>(kRows, out_features - b * kRows));
        unpack_rows(vp + b * groups * 16, pp + b * groups, groups, sp ? sp + b * kRows : nullptr,
                    wp + b * kRows * in_features, in_features, nrows);
      }
    });
  });
  return w;
}

at::Tensor sparse24_unpack(const at::Tensor& values, const at::Tensor& positions, int64_t out_features,
                           int64_t in_features, const std::optional<at::Tensor>& scales) {
  check_layout(values, positions, out_features, in_features, scales);
  return unpack_dense(values, positions, out_features, in_features, scales);
}

// The checked inputs of a linear op: x as contiguous float32 rows [tokens, in], the bias as contiguous float32
// (undefined when absent) and the output's sizes (x's with the last dim `out`).
struct LinearInput {
  at::Tensor x2, bias;
  std::vector<int64_t> out_sizes;
  int64_t tokens;
};

LinearInput linear_input(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t in,
                         int64_t out) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, op, ": x's last dim must be ", in, ", got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point");
  LinearInput r;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be [", out, "]");
    r.bias = bias->to(at::kFloat).contiguous();
  }
  r.out_sizes = x.sizes().vec();
  r.out_sizes.back() = out;
  r.tokens = x.numel() / in;
  r.x2 = x.reshape({r.tokens, in}).to(at::kFloat).contiguous();
  return r;
}

// `dense_weight` (optional, float32 [out, in], the same weight dense) with `dense_from_rows`: from that many token
// rows on the dense GEMM runs instead of the kernel, for layers where it measured faster there (the per-token-count
// dispatch of runtime/dispatch.py); without it the kernel runs every size.
at::Tensor sparse24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                           const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features,
                           const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& dense_weight,
                           int64_t dense_from_rows) {
  check_layout(values, positions, out_features, in_features, scales);
  const LinearInput io = linear_input("sparse24_linear", x, bias, in_features, out_features);
  const at::Tensor &x2 = io.x2, &b = io.bias;
  const std::vector<int64_t>& out_sizes = io.out_sizes;
  const int64_t tokens = io.tokens;
  const bool has_dense = dense_weight.has_value() && dense_weight->defined();
  if (has_dense) {
    TORCH_CHECK(dense_weight->scalar_type() == at::kFloat && dense_weight->dim() == 2 &&
                    dense_weight->size(0) == out_features && dense_weight->size(1) == in_features,
                "sparse24_linear: dense_weight must be float32 [", out_features, ", ", in_features, "]");
  }
  if ((has_dense && dense_from_rows > 0 && tokens >= dense_from_rows) || tokens >= kDenseFromRows) {
    at::Tensor w = has_dense ? *dense_weight : unpack_dense(values, positions, out_features, in_features, scales);
    at::Tensor y = b.defined() ? at::addmm(b, x2, w.t()) : at::mm(x2, w.t());
    return y.to(x.scalar_type()).reshape(out_sizes);
  }
  at::Tensor y = at::empty({tokens, out_features}, x2.options());
  if (tokens == 0) return y.to(x.scalar_type()).reshape(out_sizes);
  const int64_t blocks = values.size(0), groups = values.size(1);
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = scales_ptr(scales);
  const int32_t* pp = positions.data_ptr<int32_t>();
  // Cache blocking for many token rows: a tile of token rows x an input chunk of x stays in L2 while every row
  // block of the thread passes over it; one block's chunk of weights (8 rows x kGroupChunk groups, 17 KiB fp32)
  // stays in L1 across the tile's token rows. Decode (one tile) reads each weight byte once, straight through.
  const int64_t kc = tokens <= kMaxTokens ? groups : std::min<int64_t>(groups, kGroupChunk);
  const int64_t tile = std::max<int64_t>(kMaxTokens, kTileBytes / (kc * 16) / kMaxTokens * kMaxTokens);
  by_value_type(values, [&](auto* vp) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
    at::parallel_for(0, blocks, grain_blocks(groups, tokens), [&](int64_t b0, int64_t b1) {
      for (int64_t t0 = 0; t0 < tokens; t0 += tile) {
        const int64_t nt = std::min(tile, tokens - t0);
        for (int64_t g0 = 0; g0 < groups; g0 += kc) {
          const int64_t ng = std::min(kc, groups - g0);
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int nrows = static_cast<int>(std::min<int64_t>(kRows, out_features - blk * kRows));
            run_tokens<V>(vp + (blk * groups + g0) * 16, pp + blk * groups + g0, ng, xp + t0 * in_features + 4 * g0,
                          in_features, yp + t0 * out_features + blk * kRows, out_features,
                          bp ? bp + blk * kRows : nullptr, sp ? sp + blk * kRows : nullptr, nrows, nt, g0 > 0);
          }
        }
      }
    });
  });
  return y.to(x.scalar_type()).reshape(out_sizes);
}

// ---------------------------------------------------------------------------------------------------------------
// mrp::dense_linear: y = x W^T (* scale) + b for a dense weight stored in 16 bits or int8 (per-row scales), the
// LM head and embeddings at the engine's precision. A few token rows stream W once (memory-bound GEMV, fp32 sums);
// many rows convert a chunk of W's rows to float32 and run the GEMM on it (compute-bound, W re-read per chunk only).

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

// Rows r0..r1 of y[t, r] for NT <= 4 token rows; two rows at a time so that the loads of one overlap the FMAs of
// the other (2 x NT accumulators).
template <typename V, int NT>
void gemv_rows(const V* w, int64_t in, const float* x, int64_t ldx, float* y, int64_t ldy, const float* scale,
               const float* bias, int64_t r0, int64_t r1) {
  const int64_t in8 = in / 8 * 8;
  for (int64_t r = r0; r < r1; r += 2) {
    const int nr = r + 1 < r1 ? 2 : 1;
    __m256 acc[2][NT];
    for (int i = 0; i < 2; ++i)
      for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
    const V* w0 = w + r * in;
    const V* w1 = w + (r + nr - 1) * in;
    for (int64_t k = 0; k < in8; k += 8) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + k) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 a = load8(w0 + k), c = load8(w1 + k);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
        acc[0][t] = _mm256_fmadd_ps(a, xv, acc[0][t]);
        acc[1][t] = _mm256_fmadd_ps(c, xv, acc[1][t]);
      }
    }
    for (int i = 0; i < nr; ++i) {
      const V* wr = w + (r + i) * in;
      const float s = scale != nullptr ? scale[r + i] : 1.0f, bb = bias != nullptr ? bias[r + i] : 0.0f;
      for (int t = 0; t < NT; ++t) {
        float sum = hsum(acc[i][t]);
        for (int64_t k = in8; k < in; ++k) sum += to_float(wr[k]) * x[t * ldx + k];
        y[t * ldy + r + i] = sum * s + bb;
      }
    }
  }
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.device().is_cpu(), "dense_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "dense_linear: weight must be a contiguous [out, in] matrix");
  const int64_t out = weight.size(0), in = weight.size(1);
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16 || wt == at::kChar,
              "dense_linear: weight must be float32, float16, bfloat16 or int8, got ", wt);
  const bool scaled = scales.has_value() && scales->defined();
  TORCH_CHECK(scaled == (wt == at::kChar), "dense_linear: int8 weights need per-row scales and only they take them");
  if (scaled)
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 1 && scales->size(0) == out &&
                    scales->is_contiguous(), "dense_linear: scales must be contiguous float32 [", out, "]");
  const LinearInput io = linear_input("dense_linear", x, bias, in, out);
  const at::Tensor &x2 = io.x2, &b = io.bias;
  const std::vector<int64_t>& out_sizes = io.out_sizes;
  const int64_t tokens = io.tokens;
  at::Tensor y = at::empty({tokens, out}, x2.options());
  if (tokens == 0) return y.to(x.scalar_type()).reshape(out_sizes);
  if (tokens > kMaxTokens) {
    constexpr int64_t kChunk = 1024;  // rows converted at a time: 2.4 MB of float32 for in = 576
    for (int64_t r0 = 0; r0 < out; r0 += kChunk) {
      const int64_t n = std::min(kChunk, out - r0);
      at::Tensor w = weight.narrow(0, r0, n).to(at::kFloat);
      if (scaled) w.mul_(scales->narrow(0, r0, n).unsqueeze(1));
      at::Tensor yc = y.narrow(1, r0, n);
      if (b.defined()) {
        at::addmm_out(yc, b.narrow(0, r0, n), x2, w.t());
      } else {
        at::mm_out(yc, x2, w.t());
      }
    }
    return y.to(x.scalar_type()).reshape(out_sizes);
  }
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* sp = scales_ptr(scales);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  by_value_type(weight, [&](auto* wp) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    // grain: at least ~64 KiB of weights per task, in pairs of rows
    const int64_t grain = std::max<int64_t>(2, (65536 / std::max<int64_t>(in, 1)) / 2 * 2);
    at::parallel_for(0, (out + 1) / 2, grain / 2, [&](int64_t p0, int64_t p1) {
      const int64_t r0 = 2 * p0, r1 = std::min<int64_t>(2 * p1, out);
      switch (tokens) {
        case 1: gemv_rows<V, 1>(wp, in, xp, in, yp, out, sp, bp, r0, r1); break;
        case 2: gemv_rows<V, 2>(wp, in, xp, in, yp, out, sp, bp, r0, r1); break;
        case 3: gemv_rows<V, 3>(wp, in, xp, in, yp, out, sp, bp, r0, r1); break;
        default: gemv_rows<V, 4>(wp, in, xp, in, yp, out, sp, bp, r0, r1); break;
      }
    });
  });
  return y.to(x.scalar_type()).reshape(out_sizes);
}

// Knobs for benchmarks/cpu_sparse.py: the dense-GEMM threshold (rows), the parallel grain, and the number of OpenMP threads the
// extension itself sees (shows whether it was built with OpenMP: 1 without -fopenmp).
int64_t set_dense_threshold(int64_t rows) {
  const int64_t old = kDenseFromRows;
  kDenseFromRows = rows;
  return old;
}

int64_t set_parallel_grain(int64_t work) {
  const int64_t old = kMinParallelWork;
  kMinParallelWork = std::max<int64_t>(work, 1);
  return old;
}

int64_t parallel_threads() {
  int64_t seen = 0;
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
#pragma omp atomic
    seen += 1;
  });
  return seen;
}

}  // namespace

// FRAGMENT rather than TORCH_LIBRARY: Python code may define more mrp:: ops (torch.library) without a clash.
TORCH_LIBRARY_FRAGMENT(mrp, m) {
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor positions, Tensor? bias, int out_features, "
        "int in_features, Tensor? scales=None, Tensor? dense_weight=None, int dense_from_rows=0) -> Tensor");
  m.def("sparse24_unpack(Tensor values, Tensor positions, int out_features, int in_features, "
        "Tensor? scales=None) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? scales=None, Tensor? bias=None) -> Tensor");
  m.def("sparse24_set_dense_threshold(int rows) -> int");
  m.def("sparse24_set_parallel_grain(int work) -> int");
  m.def("sparse24_parallel_threads() -> int");
}

TORCH_LIBRARY_IMPL(mrp, CPU, m) {
  m.impl("sparse24_linear", &sparse24_linear);
  m.impl("sparse24_unpack", &sparse24_unpack);
  m.impl("dense_linear", &dense_linear);
}

TORCH_LIBRARY_IMPL(mrp, CompositeExplicitAutograd, m) {
  m.impl("sparse24_set_dense_threshold", &set_dense_threshold);
  m.impl("sparse24_set_parallel_grain", &set_parallel_grain);
  m.impl("sparse24_parallel_threads", &parallel_threads);
}
