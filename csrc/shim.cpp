// libtorch operations that tch 0.24 does not generate bindings for. Tensors cross the boundary
// as tch's `C_tensor` pointers (an `at::Tensor*`); errors come back as a message, never as a
// C++ exception across the FFI boundary.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

void write_error(const char* what, char* err, size_t err_len) {
  if (err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

std::vector<at::Tensor> gather(void* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*static_cast<at::Tensor*>(tensors[i]));
  return out;
}

}  // namespace

extern "C" {

// torch.optim.AdamW(fused=True) over `n` parameters: `_fused_adamw_` reads the step count from
// `steps` (float32 tensors on the parameters' device, already incremented by the caller).
// Returns 0 on success, 1 with a message in `err`.
int grpo_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                     void* const* exp_avg_sqs, void* const* steps, size_t n, double lr,
                     double beta1, double beta2, double weight_decay, double eps, char* err,
                     size_t err_len) {
  try {
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    auto s = gather(steps, n);
    std::vector<at::Tensor> max_sq;
    at::_fused_adamw_(p, g, m, v, max_sq, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return 1;
  }
}

// Flash attention over sequences packed end to end: query segment i is `q`'s rows
// cu_q[i]..cu_q[i+1] ([Tq, heads, d]) and attends to key segment i, rows cu_k[i]..cu_k[i+1] of
// `k`/`v` ([Tk, kv_heads, d]), causally aligned to the segments' ends (a query segment shorter
// than its keys sees the extra keys before it in full); fp16/bf16 on CUDA, cu_* int32 [n + 1],
// the default 1/sqrt(d) scale. Goes through the dispatcher, so autograd records
// `_flash_attention_backward`. On success `*out` is a new tensor [Tq, heads, d] the caller owns.
int grpo_flash_varlen(void* q, void* k, void* v, void* cu_q, void* cu_k, int64_t max_q, int64_t max_k,
                      void** out, char* err, size_t err_len) {
  try {
    auto res = at::_flash_attention_forward(
        *static_cast<at::Tensor*>(q), *static_cast<at::Tensor*>(k), *static_cast<at::Tensor*>(v),
        *static_cast<at::Tensor*>(cu_q), *static_cast<at::Tensor*>(cu_k), max_q, max_k,
        /*dropout_p=*/0.0, /*is_causal=*/true, /*return_debug_mask=*/false);
    *out = new at::Tensor(std::get<0>(res));
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return 1;
  }
}

// tensor.backward(gradient): backpropagates `grad` (same shape and dtype as `tensor`) through
// `tensor`'s graph, accumulating into the leaves' .grad. Returns 0 on success, 1 with a message.
int grpo_backward(void* tensor, void* grad, char* err, size_t err_len) {
  try {
    static_cast<at::Tensor*>(tensor)->backward(*static_cast<at::Tensor*>(grad));
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return 1;
  }
}

// torch.cuda.max_memory_allocated(device): peak bytes allocated by the CUDA caching allocator
// since the last reset, or -1 when there is no CUDA allocator (a CPU-only process).
int64_t grpo_cuda_peak_allocated(int device) {
  try {
    auto* alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto stats = alloc->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[0].peak;  // StatType::AGGREGATE
  } catch (const std::exception&) {
    return -1;
  }
}

// torch.cuda.reset_peak_memory_stats(device); 0 on success.
int grpo_cuda_reset_peak(int device) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

// torch.cuda.memory_allocated(device) and torch.cuda.memory_reserved(device) into the two
// outputs; 0 on success, 1 when there is no CUDA allocator.
int grpo_cuda_memory(int device, int64_t* allocated, int64_t* reserved) {
  try {
    auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)
                     ->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *allocated = stats.allocated_bytes[0].current;
    *reserved = stats.reserved_bytes[0].current;
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

// torch.cuda.empty_cache(): hands the caching allocator's unused blocks back to the driver.
// Returns the reserved bytes it released, or -1 when there is no CUDA allocator.
int64_t grpo_cuda_release_cached(int device) {
  try {
    auto* alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto index = static_cast<c10::DeviceIndex>(device);
    int64_t before = alloc->getDeviceStats(index).reserved_bytes[0].current;
    alloc->emptyCache();
    return before - alloc->getDeviceStats(index).reserved_bytes[0].current;
  } catch (const std::exception&) {
    return -1;
  }
}

}  // extern "C"
