// Group-relative advantages, one score per response (docs/group_advantages.md), CPU kernel.
// Plain C++ (no torch headers) so CMake builds and ctest-checks it without torch.
#pragma once
#include <cstdint>

#include "token_stats.h"  // FloatType

namespace hotloop::cpu {

enum class AdvantageKind : int { grpo = 0, dr_grpo = 1, rloo = 2, reinforce_pp_baseline = 3, passk = 4 };
enum class AdvantageScale : int { group = 0, batch = 1, none = 2 };

struct GroupAdvantagesParams {
  const void* rewards = nullptr;  // [R] contiguous, in `dtype`
  FloatType dtype = FloatType::f32;
  int64_t R = 0;
  // Fixed groups: group_size = G > 0 (R % G == 0), responses [g*G, g*G + G) form group g; group_index unused.
  // Ragged groups: group_size = 0 and group_index [R] contiguous int32/int64, each value in [0, R).
  int64_t group_size = 0;
  const void* group_index = nullptr;
  bool index_int64 = true;
  AdvantageKind kind = AdvantageKind::grpo;
  AdvantageScale scale = AdvantageScale::group;  // grpo only
  double eps = 1e-6;
  void* out = nullptr;  // [R] contiguous: double for f64 rewards, else float
  int num_threads = 1;
};

// Returns -1, or the position of the first group_index value outside [0, R) (nothing is written then).
// Per-group statistics are float64 (two passes: mean, then squared deviations); ragged groups use [R]-sized
// per-group accumulators, so memory is O(R).
int64_t group_advantages(const GroupAdvantagesParams& p);

}  // namespace hotloop::cpu
