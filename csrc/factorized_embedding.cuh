// Fused factorized-embedding lookup out[n] = P[ids[n]] @ B and its coordinates gradient.
//
// Plain CUDA launchers, no torch headers: csrc/factorized_embedding.cpp binds them to torch, and
// tests/unit/test_kernel_compile.py compiles the kernels alone with nvcc (no CUDA torch needed).
// P (coordinates) is [v_local, r], B (basis) is [r, h], both row-major and contiguous. Token ids
// are global: a token whose id - vocab_start falls outside [0, v_local) gets a zero row and gives
// no gradient, which is what a vocabulary-sharded lookup needs before its all-reduce.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace cptron {

enum class FeDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The coordinates-gradient kernel keeps one fp32 row of width round_up(r, 64) per segment in
// shared memory; this bounds the rank it accepts.
constexpr int kFeMaxRank = 1024;

// out [n, h] (same dtype as P and B), accumulating in fp32. Bf16/fp16 use tensor cores (WMMA).
cudaError_t fe_forward(FeDtype dtype, const int64_t* ids, int64_t n, const void* coords, int64_t v_local,
                       int64_t vocab_start, const void* basis, int r, int h, void* out, cudaStream_t stream);

// dP from dOut [n, h] (dtype of P), one pass over the rows of dOut that each segment names.
//
// Deterministic mode (atomic = false): `order` lists token positions sorted (stably) by id and
// `seg_offsets` [n_segments + 1] delimits runs of equal ids in it. Each segment's dOut rows are
// summed in fp32 in a fixed order, projected by B^T once, and written (plain stores, each row by one
// block) into `dcoords`, which must hold zeros and has the dtype of P. Segments whose id is out of
// range are skipped.
// Atomic mode (atomic = true, order = seg_offsets = nullptr, n_segments = n): every token is its
// own segment and its row is added with fp32 atomics into `dcoords`, an fp32 buffer of zeros.
cudaError_t fe_coords_grad(FeDtype dtype, const void* dout, const void* basis, const int64_t* ids,
                           const int64_t* order, const int64_t* seg_offsets, int64_t n_segments, int64_t v_local,
                           int64_t vocab_start, int r, int h, bool atomic, void* dcoords, cudaStream_t stream);

// Dynamic shared memory the coordinates-gradient kernel needs at rank r (bytes).
size_t fe_coords_grad_smem_bytes(FeDtype dtype, int r);

}  // namespace cptron
