// Kernels of the fused factorized-embedding lookup (see factorized_embedding.cuh and README.md).
//
// Two tile engines share every kernel: WMMA (tensor cores, 16x16x16, fp32 accumulators) for bf16
// and fp16, and a SIMT fp32 engine for fp32 inputs (TF32 tensor cores would miss the fp32 error
// bound by two orders of magnitude). Every load checks bounds, so no size needs to be a multiple of
// a tile.
#include "factorized_embedding.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace cptron {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;  // 8 warps in every kernel

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Local row of a global id, or -1 when this rank does not own it.
__device__ __forceinline__ int64_t local_row(int64_t id, int64_t vocab_start, int64_t v_local) {
  const int64_t row = id - vocab_start;
  return (row >= 0 && row < v_local) ? row : -1;
}

// ---------------------------------------------------------------------------------------------
// Forward, tensor cores: a 128 x 128 output tile per block, K = r in steps of 32. Warp w owns the
// 32 x 64 sub-tile (w / 2, w % 2) as 2 x 4 WMMA accumulators held in registers.
constexpr int kFwBM = 128, kFwBN = 128, kFwBK = 32, kFwPad = 8;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_wmma_kernel(const int64_t* __restrict__ ids, int64_t n, const T* __restrict__ coords, int64_t v_local,
                        int64_t vocab_start, const T* __restrict__ basis, int r, int h, T* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(128) T a_tile[kFwBM][kFwBK + kFwPad];
  __shared__ __align__(128) T b_tile[kFwBK][kFwBN + kFwPad];
  __shared__ __align__(128) float stage[kThreads / 32][16 * 16];
  __shared__ int64_t rows[kFwBM];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kFwBM;
  const int n0 = blockIdx.x * kFwBN;
  for (int i = tid; i < kFwBM; i += kThreads) {
    rows[i] = (m0 + i < n) ? local_row(ids[m0 + i], vocab_start, v_local) : -1;
  }
  const int wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  __syncthreads();

  const T zero = from_float<T>(0.0f);
  for (int k0 = 0; k0 < r; k0 += kFwBK) {
    for (int e = tid; e < kFwBM * kFwBK; e += kThreads) {
      const int i = e / kFwBK, k = e % kFwBK;
      const int64_t row = rows[i];
      a_tile[i][k] = (row >= 0 && k0 + k < r) ? coords[row * r + k0 + k] : zero;
    }
    for (int e = tid; e < kFwBK * kFwBN; e += kThreads) {
      const int k = e / kFwBN, j = e % kFwBN;
      b_tile[k][j] = (k0 + k < r && n0 + j < h) ? basis[static_cast<int64_t>(k0 + k) * h + n0 + j] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kFwBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &a_tile[wm * 32 + i * 16][kk], kFwBK + kFwPad);
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(b[j], &b_tile[kk][wn * 64 + j * 16], kFwBN + kFwPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Through a per-warp staging tile, so that partial tiles at the edges are written element-wise.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(stage[warp], acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t m = m0 + wm * 32 + i * 16 + e / 16;
        const int c = n0 + wn * 64 + j * 16 + e % 16;
        if (m < n && c < h) out[m * h + c] = from_float<T>(stage[warp][e]);
      }
      __syncwarp();
    }
  }
#else
  __trap();  // built for an architecture without bf16 tensor cores; the binding rejects these GPUs first
#endif
}

// ---------------------------------------------------------------------------------------------
// Forward, SIMT fp32 engine: a 64 x 64 tile per block, each thread a 4 x 4 register block.
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_simt_kernel(const int64_t* __restrict__ ids, int64_t n, const T* __restrict__ coords, int64_t v_local,
                        int64_t vocab_start, const T* __restrict__ basis, int r, int h, T* __restrict__ out) {
  __shared__ float a_tile[kSimtBK][kSimtBM + 4];  // transposed: a warp reads one k across rows
  __shared__ float b_tile[kSimtBK][kSimtBN + 4];
  __shared__ int64_t rows[kSimtBM];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSimtBM;
  const int n0 = blockIdx.x * kSimtBN;
  for (int i = tid; i < kSimtBM; i += kThreads) {
    rows[i] = (m0 + i < n) ? local_row(ids[m0 + i], vocab_start, v_local) : -1;
  }
  float acc[4][4] = {};
  __syncthreads();
  for (int k0 = 0; k0 < r; k0 += kSimtBK) {
    for (int e = tid; e < kSimtBM * kSimtBK; e += kThreads) {
      const int i = e / kSimtBK, k = e % kSimtBK;
      const int64_t row = rows[i];
      a_tile[k][i] = (row >= 0 && k0 + k < r) ? to_float(coords[row * r + k0 + k]) : 0.0f;
    }
    for (int e = tid; e < kSimtBK * kSimtBN; e += kThreads) {
      const int k = e / kSimtBN, j = e % kSimtBN;
      b_tile[k][j] = (k0 + k < r && n0 + j < h) ? to_float(basis[static_cast<int64_t>(k0 + k) * h + n0 + j]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtBK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = b_tile[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = n0 + tx + 16 * j;
      if (m < n && c < h) out[m * h + c] = from_float<T>(acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Coordinates gradient: a block owns kCgBM segments (runs of one id, or single tokens in atomic
// mode) and all r columns of their gradient rows, accumulated in fp32 shared memory. It walks H
// in chunks of kCgBH: sums each segment's dOut rows for the chunk (G, fixed order), then adds
// G @ B^T[chunk, :] group by group of kCgRG columns. Each dOut element is read once.
constexpr int kCgBM = 32, kCgBH = 32, kCgRG = 64, kCgPad = 8;

// MT: the type the products run in (T for the tensor-core engine, float for SIMT).
template <typename T, bool kWmma>
struct CgTypes {
  using MT = typename std::conditional<kWmma, T, float>::type;
};

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

template <typename MT>
__host__ __device__ constexpr size_t cg_smem_bytes(int r) {
  return align128(sizeof(float) * kCgBM * round_up(r, kCgRG)) + align128(sizeof(MT) * kCgBM * (kCgBH + kCgPad)) +
         align128(sizeof(MT) * kCgBH * (kCgRG + kCgPad)) + sizeof(int64_t) * 3 * kCgBM;
}

template <typename T, bool kWmma, bool kAtomic>
__global__ void __launch_bounds__(kThreads)
    coords_grad_kernel(const T* __restrict__ dout, const T* __restrict__ basis, const int64_t* __restrict__ ids,
                       const int64_t* __restrict__ order, const int64_t* __restrict__ seg_offsets, int64_t n_segments,
                       int64_t v_local, int64_t vocab_start, int r, int h, void* __restrict__ dcoords) {
  using MT = typename CgTypes<T, kWmma>::MT;
  extern __shared__ __align__(128) unsigned char smem[];
  const int r_pad = round_up(r, kCgRG);
  float* acc = reinterpret_cast<float*>(smem);  // [kCgBM][r_pad]
  size_t offset = align128(sizeof(float) * kCgBM * r_pad);
  MT* g_tile = reinterpret_cast<MT*>(smem + offset);  // [kCgBM][kCgBH + kCgPad]
  offset += align128(sizeof(MT) * kCgBM * (kCgBH + kCgPad));
  MT* bt_tile = reinterpret_cast<MT*>(smem + offset);  // [kCgBH][kCgRG + kCgPad]: B^T for this chunk
  offset += align128(sizeof(MT) * kCgBH * (kCgRG + kCgPad));
  int64_t* seg_begin = reinterpret_cast<int64_t*>(smem + offset);
  int64_t* seg_end = seg_begin + kCgBM;
  int64_t* rows = seg_end + kCgBM;

  const int tid = threadIdx.x;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kCgBM;
  for (int i = tid; i < kCgBM; i += kThreads) {
    const int64_t s = s0 + i;
    int64_t begin = 0, end = 0, row = -1;
    if (s < n_segments) {
      begin = kAtomic ? s : seg_offsets[s];
      end = kAtomic ? s + 1 : seg_offsets[s + 1];
      row = local_row(ids[kAtomic ? s : order[begin]], vocab_start, v_local);
    }
    seg_begin[i] = begin;
    seg_end[i] = row >= 0 ? end : begin;  // an unowned id contributes nothing
    rows[i] = row;
  }
  for (int e = tid; e < kCgBM * r_pad; e += kThreads) acc[e] = 0.0f;
  __syncthreads();

  for (int h0 = 0; h0 < h; h0 += kCgBH) {
    for (int e = tid; e < kCgBM * kCgBH; e += kThreads) {
      const int i = e / kCgBH, c = e % kCgBH;
      float sum = 0.0f;
      if (h0 + c < h) {
        for (int64_t j = seg_begin[i]; j < seg_end[i]; ++j) {
          const int64_t token = kAtomic ? j : order[j];
          sum += to_float(dout[token * h + h0 + c]);
        }
      }
      g_tile[i * (kCgBH + kCgPad) + c] = from_float<MT>(sum);
    }
    for (int g0 = 0; g0 < r; g0 += kCgRG) {
      for (int e = tid; e < kCgBH * kCgRG; e += kThreads) {
        const int j = e / kCgBH, k = e % kCgBH;  // consecutive threads walk along a row of B
        const bool inside = g0 + j < r && h0 + k < h;
        bt_tile[k * (kCgRG + kCgPad) + j] =
            inside ? from_float<MT>(to_float(basis[static_cast<int64_t>(g0 + j) * h + h0 + k])) : from_float<MT>(0.0f);
      }
      __syncthreads();
      if constexpr (kWmma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        // 2 x 4 accumulator tiles of 16 x 16, one per warp.
        const int fm = tid / 32 / 4, fn = tid / 32 % 4;
        float* c_ptr = acc + static_cast<size_t>(fm * 16) * r_pad + g0 + fn * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
        wmma::load_matrix_sync(c, c_ptr, r_pad, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < kCgBH; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, g_tile + fm * 16 * (kCgBH + kCgPad) + kk, kCgBH + kCgPad);
          wmma::load_matrix_sync(b, bt_tile + kk * (kCgRG + kCgPad) + fn * 16, kCgRG + kCgPad);
          wmma::mma_sync(c, a, b, c);
        }
        wmma::store_matrix_sync(c_ptr, c, r_pad, wmma::mem_row_major);
#else
        __trap();
#endif
      } else {
        // 32 x 64 outputs, 8 per thread: row tid / 8, columns tid % 8 + 8q.
        const int i = tid / 8;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int j = tid % 8 + 8 * q;
          float sum = 0.0f;
#pragma unroll 8
          for (int k = 0; k < kCgBH; ++k) {
            sum = fmaf(to_float(g_tile[i * (kCgBH + kCgPad) + k]), to_float(bt_tile[k * (kCgRG + kCgPad) + j]), sum);
          }
          acc[static_cast<size_t>(i) * r_pad + g0 + j] += sum;
        }
      }
      __syncthreads();
    }
  }

  for (int e = tid; e < kCgBM * r; e += kThreads) {
    const int i = e / r, j = e % r;
    const int64_t row = rows[i];
    if (row < 0) continue;
    const float v = acc[static_cast<size_t>(i) * r_pad + j];
    if constexpr (kAtomic) {
      atomicAdd(static_cast<float*>(dcoords) + row * r + j, v);
    } else {
      static_cast<T*>(dcoords)[row * r + j] = from_float<T>(v);  // one block per id: no race
    }
  }
}

template <typename T, bool kWmma>
cudaError_t launch_forward(const int64_t* ids, int64_t n, const void* coords, int64_t v_local, int64_t vocab_start,
                           const void* basis, int r, int h, void* out, cudaStream_t stream) {
  const T* p = static_cast<const T*>(coords);
  const T* b = static_cast<const T*>(basis);
  T* o = static_cast<T*>(out);
  if constexpr (kWmma) {
    const dim3 grid((h + kFwBN - 1) / kFwBN, static_cast<unsigned>((n + kFwBM - 1) / kFwBM));
    forward_wmma_kernel<T><<<grid, kThreads, 0, stream>>>(ids, n, p, v_local, vocab_start, b, r, h, o);
  } else {
    const dim3 grid((h + kSimtBN - 1) / kSimtBN, static_cast<unsigned>((n + kSimtBM - 1) / kSimtBM));
    forward_simt_kernel<T><<<grid, kThreads, 0, stream>>>(ids, n, p, v_local, vocab_start, b, r, h, o);
  }
  return cudaGetLastError();
}

template <typename T, bool kWmma, bool kAtomic>
cudaError_t launch_coords_grad(const void* dout, const void* basis, const int64_t* ids, const int64_t* order,
                               const int64_t* seg_offsets, int64_t n_segments, int64_t v_local, int64_t vocab_start,
                               int r, int h, void* dcoords, cudaStream_t stream) {
  using MT = typename CgTypes<T, kWmma>::MT;
  const size_t smem = cg_smem_bytes<MT>(r);
  auto kernel = coords_grad_kernel<T, kWmma, kAtomic>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((n_segments + kCgBM - 1) / kCgBM);
  kernel<<<blocks, kThreads, smem, stream>>>(static_cast<const T*>(dout), static_cast<const T*>(basis), ids, order,
                                             seg_offsets, n_segments, v_local, vocab_start, r, h, dcoords);
  return cudaGetLastError();
}

template <typename T, bool kWmma>
cudaError_t coords_grad_mode(bool atomic, const void* dout, const void* basis, const int64_t* ids,
                             const int64_t* order, const int64_t* seg_offsets, int64_t n_segments, int64_t v_local,
                             int64_t vocab_start, int r, int h, void* dcoords, cudaStream_t stream) {
  if (atomic) {
    return launch_coords_grad<T, kWmma, true>(dout, basis, ids, nullptr, nullptr, n_segments, v_local, vocab_start, r,
                                              h, dcoords, stream);
  }
  return launch_coords_grad<T, kWmma, false>(dout, basis, ids, order, seg_offsets, n_segments, v_local, vocab_start,
                                             r, h, dcoords, stream);
}

}  // namespace

cudaError_t fe_forward(FeDtype dtype, const int64_t* ids, int64_t n, const void* coords, int64_t v_local,
                       int64_t vocab_start, const void* basis, int r, int h, void* out, cudaStream_t stream) {
  if (n == 0 || h == 0) return cudaSuccess;
  switch (dtype) {
    case FeDtype::kFloat32:
      return launch_forward<float, false>(ids, n, coords, v_local, vocab_start, basis, r, h, out, stream);
    case FeDtype::kBFloat16:
      return launch_forward<__nv_bfloat16, true>(ids, n, coords, v_local, vocab_start, basis, r, h, out, stream);
    case FeDtype::kFloat16:
      return launch_forward<__half, true>(ids, n, coords, v_local, vocab_start, basis, r, h, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t fe_coords_grad(FeDtype dtype, const void* dout, const void* basis, const int64_t* ids,
                           const int64_t* order, const int64_t* seg_offsets, int64_t n_segments, int64_t v_local,
                           int64_t vocab_start, int r, int h, bool atomic, void* dcoords, cudaStream_t stream) {
  if (n_segments == 0 || r == 0) return cudaSuccess;
  if (r > kFeMaxRank) return cudaErrorInvalidValue;
  switch (dtype) {
    case FeDtype::kFloat32:
      return coords_grad_mode<float, false>(atomic, dout, basis, ids, order, seg_offsets, n_segments, v_local,
                                            vocab_start, r, h, dcoords, stream);
    case FeDtype::kBFloat16:
      return coords_grad_mode<__nv_bfloat16, true>(atomic, dout, basis, ids, order, seg_offsets, n_segments, v_local,
                                                   vocab_start, r, h, dcoords, stream);
    case FeDtype::kFloat16:
      return coords_grad_mode<__half, true>(atomic, dout, basis, ids, order, seg_offsets, n_segments, v_local,
                                            vocab_start, r, h, dcoords, stream);
  }
  return cudaErrorInvalidValue;
}

size_t fe_coords_grad_smem_bytes(FeDtype dtype, int r) {
  return dtype == FeDtype::kFloat32 ? cg_smem_bytes<float>(r) : cg_smem_bytes<__half>(r);
}

}  // namespace cptron
