// L2 eviction priorities for the copies that take a cache hint (.L2::cache_hint operands).
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA (createpolicy): a policy that marks every line an access brings into L2 as the
// first to evict. For data read once (a stream much larger than L2): it then replaces other
// streamed lines, not what others keep in L2, and not dirty lines that would have to be written back.
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

}  // namespace dso::ptx
