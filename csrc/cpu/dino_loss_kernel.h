// Body of the DINO loss CPU kernel. Included once per ISA by dino_loss_{avx512,avx2,base}.cpp (see isa.h).
//
// With s' = s / tau_s, q_i = softmax((t_i - c) / tau_t) (sum 1), m_v = the number of teacher crops paired with
// student crop v (n_global, less one when v is itself a global crop) and r_v = sum_{i != v} q_i:
//   sum_{i != v} -q_i . log_softmax(s'_v) = m_v * lse(s'_v) - r_v . s'_v
//   d/ds_v = (m_v * softmax(s'_v) - r_v) / tau_s                       (then / (n_terms * B))
// so one image b needs its n_global teacher softmaxes and their sum (thread-local, L2-resident), and each of
// its student rows three streaming loops: the max, then exp / sum / dot (the exps kept in a row buffer), then
// the gradient from that buffer, one exp per element in all. Threads split the images; the per-image losses are
// summed in image order, so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dino_loss.h"
#include "isa.h"
#include "simd_math.h"

#if HOTLOOP_ISA_COMPILED
HOTLOOP_ISA_BEGIN

namespace hotloop::cpu::HOTLOOP_ISA {
namespace {

template <class Acc> constexpr Acc kInf = std::numeric_limits<Acc>::infinity();

// max_k x[k] * scale (after subtracting c[k] when given)
template <class T, class Acc>
Acc row_max(const T* __restrict x, const Acc* __restrict c, int64_t K, Acc scale) {
  Acc m = -kInf<Acc>;
  if (c != nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) {
      const Acc v = (Acc(to_float(x[k])) - c[k]) * scale;
      m = v > m ? v : m;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) {
      const Acc v = Acc(to_float(x[k])) * scale;
      m = v > m ? v : m;
    }
  }
  return m;
}

// q = softmax((t - c) * inv_tau) into q[0, K)
template <class T, class Acc>
void teacher_softmax(const T* __restrict t, const Acc* __restrict c, int64_t K, Acc inv_tau, Acc* __restrict q) {
  const Acc m = row_max(t, c, K, inv_tau);
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) {
    const Acc e = exp_acc((Acc(to_float(t[k])) - c[k]) * inv_tau - m);
    q[k] = e;
    s += e;
  }
  const Acc inv_s = Acc(1) / s;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) q[k] *= inv_s;
}

// One student row: returns m_v * lse(s') - r . s'; writes g = (m_v softmax(s') - r) * gscale when g != null.
// r = qsum - f * qv (f = 1 when the crop is global: its own teacher crop is not paired with it).
template <class T, class Acc>
Acc student_row(const T* __restrict s, int64_t K, Acc inv_tau, Acc m_v, const Acc* __restrict qsum,
                const Acc* __restrict qv, Acc f, Acc* __restrict e, T* __restrict g, Acc gscale) {
  const Acc m = row_max(s, static_cast<const Acc*>(nullptr), K, inv_tau);
  Acc sum = 0, dot = 0;
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t k = 0; k < K; ++k) {
    const Acc x = Acc(to_float(s[k])) * inv_tau;
    const Acc ek = exp_acc(x - m);
    e[k] = ek;
    sum += ek;
    dot += (qsum[k] - f * qv[k]) * x;
  }
  const Acc lse = m + std::log(sum);
  if (g != nullptr) {
    const Acc a = m_v * gscale / sum;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) store(g + k, e[k] * a - (qsum[k] - f * qv[k]) * gscale);
  }
  return m_v * lse - dot;
}

template <class T>
void run(const DinoLossParams& p) {
  using Acc = typename acc_type<T>::type;
  const int64_t B = p.B, K = p.K, NC = p.n_crops, NG = p.n_global;
  const T* student = static_cast<const T*>(p.student);
  const T* teacher = static_cast<const T*>(p.teacher);
  const Acc* center = static_cast<const Acc*>(p.center);
  T* grad = static_cast<T*>(p.grad_student);
  const Acc inv_ts = Acc(1.0 / p.tau_s), inv_tt = Acc(1.0 / p.tau_t);
  const int64_t n_terms = NG * NC - std::min(NG, NC);
  const Acc gscale = Acc(1.0 / (p.tau_s * double(n_terms) * double(B)));
  std::vector<double> per_image(B, 0.0);
  const int nt = std::max(1, std::min<int>(p.num_threads, int(std::min<int64_t>(B, 1 << 20))));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<Acc> q(NG * K), qsum(K), e(K);  // thread-local: teacher softmaxes, their sum, a row of exps
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < NG; ++i) teacher_softmax(teacher + (i * B + b) * K, center, K, inv_tt, &q[i * K]);
      std::fill(qsum.begin(), qsum.end(), Acc(0));
      for (int64_t i = 0; i < NG; ++i) {
        const Acc* qi = &q[i * K];
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) qsum[k] += qi[k];
      }
      double total = 0;
      for (int64_t v = 0; v < NC; ++v) {
        const bool global = v < NG;
        const Acc m_v = Acc(NG - (global ? 1 : 0));
        const int64_t row = (v * B + b) * K;
        total += double(student_row(student + row, K, inv_ts, m_v, qsum.data(), &q[(global ? v : 0) * K],
                                    Acc(global ? 1 : 0), e.data(), grad ? grad + row : nullptr, gscale));
      }
      per_image[b] = total;
    }
  }
  double total = 0;
  for (int64_t b = 0; b < B; ++b) total += per_image[b];
  const double loss = total / (double(n_terms) * double(B));
  if (p.dtype == FloatType::f64) *static_cast<double*>(p.loss) = loss;
  else *static_cast<float*>(p.loss) = float(loss);
}

}  // namespace

void dino_loss(const DinoLossParams& p) {
  switch (p.dtype) {
    case FloatType::f32: return run<float>(p);
    case FloatType::f64: return run<double>(p);
    case FloatType::bf16: return run<bf16>(p);
    case FloatType::f16: return run<f16>(p);
  }
}

}  // namespace hotloop::cpu::HOTLOOP_ISA

HOTLOOP_ISA_END
#endif
