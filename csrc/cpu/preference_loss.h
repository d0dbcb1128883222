// Per-pair contracts of the DPO-family preference losses (docs/preference_loss.md) and KTO, CPU kernels: elementwise maps from
// sequence log-prob sums to a loss and its gradients per pair. The contract, in plain torch, is
// preference_pairs_ref / kto_items_ref in python/hotloop/reference/preference_loss.py. Plain C++ (no torch
// headers) so CMake builds and ctest-checks it.
#pragma once
#include <cstdint>

#include "token_stats.h"  // FloatType

namespace hotloop::cpu {

// The order of KINDS in python/hotloop/reference/preference_loss.py
enum class PreferenceKind : int {
  sigmoid = 0, cdpo = 1, robust = 2, hinge = 3, ipo = 4, bco_pair = 5, sppo_hard = 6, apo_zero = 7,
  apo_down = 8, simpo = 9, orpo = 10, cream = 11
};
constexpr int kNumPreferenceKinds = 12;

// Every array is [B] contiguous in `dtype` (f32 or f64).
struct PreferencePairsParams {
  FloatType dtype = FloatType::f32;
  int64_t B = 0;
  const void* x_w = nullptr;    // policy sequence log-prob sums, chosen / rejected
  const void* x_l = nullptr;
  const void* r_w = nullptr;    // reference's (ignored by simpo / orpo)
  const void* r_l = nullptr;
  const void* len_w = nullptr;  // lengths, already >= 1 (read by ipo / simpo / orpo)
  const void* len_l = nullptr;
  const void* c = nullptr;      // CREAM consistency (read by cream)
  const void* nll = nullptr;    // chosen NLL (read by orpo)
  PreferenceKind kind = PreferenceKind::sigmoid;
  double beta = 0.1, label_smoothing = 0.0, gamma = 0.5;
  void* loss = nullptr;         // out: per-pair loss
  void* g_w = nullptr;          // out: d loss / d x_w
  void* g_l = nullptr;          // out: d loss / d x_l
  void* g_nll = nullptr;        // out: d loss / d nll (1 for orpo, else 0)
  int num_threads = 1;
};
void preference_pairs(const PreferencePairsParams& p);

struct KtoItemsParams {
  FloatType dtype = FloatType::f32;
  int64_t B = 0;
  const void* x = nullptr;  // policy log-prob sums
  const void* r = nullptr;  // reference's
  const void* d = nullptr;  // 1 desirable, 0 undesirable
  double kl = 0.0;          // already clamped >= 0
  double beta = 0.1, desirable_weight = 1.0, undesirable_weight = 1.0;
  void* loss = nullptr;     // out: per-item loss
  void* g = nullptr;        // out: d loss / d x
  int num_threads = 1;
};
void kto_items(const KtoItemsParams& p);

}  // namespace hotloop::cpu
