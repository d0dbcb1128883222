// Per-token log-prob / entropy / self-certainty over the vocabulary (docs/token_stats.md), CPU kernels.
// Plain C++ (no torch headers) so CMake builds and ctest-checks it without torch.
#pragma once
#include <cstdint>

namespace hotloop::cpu {

enum class FloatType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// Logits are rows of V contiguous elements; row r = b * T + t starts at b * stride_b + t * stride_t (elements).
struct RowLayout {
  int64_t B = 0, T = 0, V = 0;
  int64_t stride_b = 0, stride_t = 0;
  int64_t rows() const { return B * T; }
  int64_t offset(int64_t row) const { return (row / T) * stride_b + (row % T) * stride_t; }
};

struct TokenStatsFwdParams {
  const void* logits = nullptr;  // [B, T, V] in `dtype`
  FloatType dtype = FloatType::f32;
  RowLayout layout;
  const void* labels = nullptr;  // [B * T] contiguous
  bool labels_int64 = true;
  double temperature = 1.0;
  int64_t ignore_index = -100;
  // Outputs, [B * T] contiguous, double for f64 logits else float. entropy / self_certainty may be null.
  void* logprobs = nullptr;
  void* entropy = nullptr;
  void* self_certainty = nullptr;
  void* lse = nullptr;  // logsumexp(z / T), for the backward
  int num_threads = 1;
};

// Returns -1, or the row of the first label outside [0, V) that is not ignore_index (that row's outputs are NaN).
int64_t token_stats_fwd(const TokenStatsFwdParams& p);

struct TokenStatsBwdParams {
  void* grad_logits = nullptr;  // [B, T, V] in `dtype`, rows at grad_layout; may alias logits
  RowLayout grad_layout;
  const void* logits = nullptr;
  FloatType dtype = FloatType::f32;
  RowLayout layout;
  const void* labels = nullptr;
  bool labels_int64 = true;
  double temperature = 1.0;
  int64_t ignore_index = -100;
  // [B * T] contiguous, the forward's output type; null = no gradient flows through that output.
  const void* grad_logprobs = nullptr;
  const void* grad_entropy = nullptr;
  const void* grad_self_certainty = nullptr;
  const void* lse = nullptr;
  const void* entropy = nullptr;  // needed when grad_entropy is set
  // The rows may hold a block of columns [vocab_offset, vocab_offset + V) of a vocabulary of vocab_total
  // (0 = V) entries: labels are global and the self-certainty term uses vocab_total. The fused linear path
  // recomputes logits one vocabulary block at a time and gets each block's gradient this way.
  int64_t vocab_offset = 0;
  int64_t vocab_total = 0;
  int num_threads = 1;
};

void token_stats_bwd(const TokenStatsBwdParams& p);

// Name of the instruction set the kernels run with on this CPU ("avx512", "avx2", "base").
const char* token_stats_isa();

}  // namespace hotloop::cpu
