// Torch binding of the fused factorized-embedding kernels (csrc/factorized_embedding_kernels.cu).
//
// Thin on purpose: argument checks, the sort by id that makes the backward deterministic, the
// basis gradient through cuBLAS, and the launches. The Python side (cptron/kernels/
// factorized_embedding_op.py) registers these as the CUDA implementation of the torch.library ops
// cptron::factorized_embedding_fwd / _bwd.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "factorized_embedding.cuh"

namespace {

cptron::FeDtype kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cptron::FeDtype::kFloat32;
    case at::kBFloat16:
      return cptron::FeDtype::kBFloat16;
    case at::kHalf:
      return cptron::FeDtype::kFloat16;
    default:
      TORCH_CHECK(false, "factorized_embedding CUDA kernel: dtype ", t.scalar_type(),
                  " is not supported (expected float32, bfloat16 or float16)");
  }
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attr, device);
  TORCH_CHECK(err == cudaSuccess, "factorized_embedding: cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return value;
}

void check_inputs(const at::Tensor& ids, const at::Tensor& coords, const at::Tensor& basis) {
  TORCH_CHECK(coords.is_cuda() && basis.is_cuda() && ids.is_cuda(), "factorized_embedding: tensors must be on CUDA");
  TORCH_CHECK(coords.device() == basis.device() && ids.device() == coords.device(),
              "factorized_embedding: ids, coordinates and basis must be on one device");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "factorized_embedding: ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(coords.dim() == 2 && basis.dim() == 2 && coords.size(1) == basis.size(0),
              "factorized_embedding: expected coordinates [V, r] and basis [r, H], got ", coords.sizes(), " and ",
              basis.sizes());
  TORCH_CHECK(coords.scalar_type() == basis.scalar_type(), "factorized_embedding: coordinates (",
              coords.scalar_type(), ") and basis (", basis.scalar_type(), ") must share a dtype");
  kernel_dtype(coords);
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, coords.get_device());
  TORCH_CHECK(major >= 8, "factorized_embedding CUDA kernel needs compute capability 8.0 or newer, got ", major);
  TORCH_CHECK(basis.size(1) <= INT32_MAX && coords.size(1) <= INT32_MAX, "factorized_embedding: r and H must fit int32");
  // Token tiles run along grid.y (at most 65535 tiles of 64 tokens).
  TORCH_CHECK(ids.numel() <= int64_t(65535) * 64, "factorized_embedding: at most ", int64_t(65535) * 64,
              " tokens per call, got ", ids.numel());
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "factorized_embedding ", what, " failed: ", cudaGetErrorString(err));
}

std::vector<int64_t> out_shape(const at::Tensor& ids, int64_t h) {
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(h);
  return shape;
}

at::Tensor forward(const at::Tensor& ids, const at::Tensor& coords, const at::Tensor& basis, int64_t vocab_start) {
  check_inputs(ids, coords, basis);
  const c10::cuda::CUDAGuard guard(coords.device());
  const auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const auto p = coords.contiguous(), b = basis.contiguous();
  const int64_t n = flat.numel(), r = p.size(1), h = b.size(1);
  auto out = at::empty({n, h}, p.options());
  check_cuda(cptron::fe_forward(kernel_dtype(p), flat.data_ptr<int64_t>(), n, p.data_ptr(), p.size(0), vocab_start,
                                b.data_ptr(), static_cast<int>(r), static_cast<int>(h), out.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()),
             "forward launch");
  return out.view(out_shape(ids, h));
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& coords,
                                            const at::Tensor& basis, int64_t vocab_start, bool deterministic) {
  check_inputs(ids, coords, basis);
  const c10::cuda::CUDAGuard guard(coords.device());
  const auto p = coords.contiguous(), b = basis.contiguous();
  const int64_t v = p.size(0), r = p.size(1), h = b.size(1);
  TORCH_CHECK(r <= cptron::kFeMaxRank, "factorized_embedding CUDA backward supports r <= ", cptron::kFeMaxRank,
              ", got r = ", r);
  const size_t smem = cptron::fe_coords_grad_smem_bytes(kernel_dtype(p), static_cast<int>(r));
  const int smem_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, p.get_device());
  TORCH_CHECK(smem <= static_cast<size_t>(smem_limit), "factorized_embedding CUDA backward at r = ", r, " needs ", smem,
              " bytes of shared memory per block; this GPU allows ", smem_limit);
  const auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t n = flat.numel();
  TORCH_CHECK(grad_out.numel() == n * h, "factorized_embedding backward: grad_out has ", grad_out.numel(),
              " elements, expected ", n * h);
  const auto dout = grad_out.to(p.scalar_type()).contiguous().view({n, h});
  const auto local = flat - vocab_start;
  const auto owned = local.ge(0).logical_and(local.lt(v));

  // dB = P[ids]^T dOut over owned tokens: a GEMM that reduces over tokens, left to cuBLAS (tensor
  // cores, fp32 accumulation); see csrc/README.md for why it is not fused with dP.
  const auto rows = p.index_select(0, local.clamp(0, std::max<int64_t>(v - 1, 0))) * owned.unsqueeze(1).to(p.dtype());
  auto grad_basis = at::mm(rows.t(), dout);

  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_coords;
  if (deterministic) {
    // Sort by id (unowned tokens sort last, as id v), then one segment per distinct id.
    const auto keys = at::where(owned, local, at::full_like(local, v));
    at::Tensor sorted, order;
    std::tie(sorted, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    at::Tensor counts = std::get<2>(at::unique_consecutive(sorted, false, true));
    const auto offsets = at::cat({at::zeros({1}, counts.options()), at::cumsum(counts, 0)});
    grad_coords = at::zeros_like(p);
    check_cuda(cptron::fe_coords_grad(kernel_dtype(p), dout.data_ptr(), b.data_ptr(), flat.data_ptr<int64_t>(),
                                      order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), counts.numel(), v,
                                      vocab_start, static_cast<int>(r), static_cast<int>(h), false,
                                      grad_coords.data_ptr(), stream),
               "deterministic coordinates-gradient launch");
  } else {
    auto acc = at::zeros({v, r}, p.options().dtype(at::kFloat));
    check_cuda(cptron::fe_coords_grad(kernel_dtype(p), dout.data_ptr(), b.data_ptr(), flat.data_ptr<int64_t>(), nullptr,
                                      nullptr, n, v, vocab_start, static_cast<int>(r), static_cast<int>(h), true,
                                      acc.data_ptr(), stream),
               "atomic coordinates-gradient launch");
    grad_coords = acc.to(p.scalar_type());
  }
  return {grad_coords, grad_basis};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cptron fused factorized-embedding lookup (csrc/)";
  m.def("forward", &forward, "out = P[ids - vocab_start] @ B, zero rows for ids this shard does not own");
  m.def("backward", &backward, "(dP, dB) from dOut; deterministic: sort by id + segmented reduction, else atomics");
  m.attr("max_rank") = cptron::kFeMaxRank;
}
