// Shared argument checks and tensor -> plain-params helpers for the torch bindings of every op.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../cpu/token_stats.h"

namespace hotloop::bind {

inline cpu::FloatType float_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::FloatType::f32;
    case at::kDouble: return cpu::FloatType::f64;
    case at::kBFloat16: return cpu::FloatType::bf16;
    case at::kHalf: return cpu::FloatType::f16;
    default: TORCH_CHECK_TYPE(false, op, ": `", name, "` must be float32/float64/bfloat16/float16, got ", t.scalar_type());
  }
}

// A [B, T, V] tensor whose rows are contiguous (stride(2) == 1), any leading strides.
inline cpu::RowLayout row_layout(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": `", name, "` must be [B, T, V], got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) == 1, op, ": `", name, "` must have unit stride along V");
  cpu::RowLayout L;
  L.B = t.size(0), L.T = t.size(1), L.V = t.size(2);
  L.stride_b = t.stride(0), L.stride_t = t.stride(1);
  return L;
}

inline void check_rows(const at::Tensor& t, const cpu::RowLayout& L, at::ScalarType dtype, const char* op,
                       const char* name) {
  TORCH_CHECK_VALUE(t.numel() == L.rows() && t.is_contiguous(), op, ": `", name, "` must be contiguous with ",
                    L.rows(), " elements, got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": `", name, "` must be ", dtype, ", got ", t.scalar_type());
}

inline void check_labels(const at::Tensor& labels, const cpu::RowLayout& L, const char* op) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
                   ": `labels` must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.numel() == L.rows() && labels.is_contiguous(), op,
                    ": `labels` must be contiguous [B, T] = [", L.B, ", ", L.T, "], got ", labels.sizes());
}

// Data pointer of an optional [B, T] gradient, or nullptr when it is absent.
inline const void* optional_rows(const c10::optional<at::Tensor>& t, const cpu::RowLayout& L, at::ScalarType dtype,
                                 const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_rows(*t, L, dtype, op, name);
  return t->data_ptr();
}

}  // namespace hotloop::bind
