// CUDA caching-allocator statistics (torch.cuda.max_memory_allocated and friends), built only
// with the `cuda` feature.
#include <c10/cuda/CUDACachingAllocator.h>

#include <cstdint>
#include <exception>

extern "C" {

// Peak bytes allocated on `device` since the last reset, or -1 on error.
int64_t grpo_cuda_peak_allocated(int device) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[0].peak;  // StatType::AGGREGATE
  } catch (const std::exception&) {
    return -1;
  }
}

// Resets the peak statistics of `device`; 0 on success.
int grpo_cuda_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

}  // extern "C"
