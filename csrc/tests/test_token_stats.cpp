// ctest: the token_stats CPU kernels against a plain double-precision computation, for every ISA this CPU has,
// every input type, strided rows, ignored and out-of-range labels, one and many threads.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/simd_math.h"
#include "cpu/token_stats.h"

using namespace hotloop::cpu;

namespace {

int failures = 0;

void expect_close(double got, double want, double tol, const char* what, int64_t row) {
  const double err = std::fabs(got - want) / std::max(1.0, std::fabs(want));
  if (!(err <= tol)) {
    std::printf("FAIL %s row %lld: got %.9g want %.9g\n", what, static_cast<long long>(row), got, want);
    ++failures;
  }
}

struct Reference {
  double logprob, entropy, self_certainty, lse;
};

Reference reference_row(const std::vector<double>& z, int64_t y, double temperature) {
  double m = -INFINITY;
  for (double v : z) m = std::max(m, v / temperature);
  double s = 0, a = 0, b = 0;
  for (double v : z) {
    const double zp = v / temperature, e = std::exp(zp - m);
    s += e, a += e * (zp - m), b += zp;
  }
  const double lse = m + std::log(s), V = static_cast<double>(z.size());
  return {z[y] / temperature - lse, std::log(s) - a / s, lse - b / V - std::log(V), lse};
}

template <class In> In from_double(double v);
template <> float from_double<float>(double v) { return static_cast<float>(v); }
template <> double from_double<double>(double v) { return v; }
template <> bf16 from_double<bf16>(double v) { bf16 h; store(&h, static_cast<float>(v)); return h; }
template <> f16 from_double<f16>(double v) { f16 h; store(&h, static_cast<float>(v)); return h; }

template <class In>
void check(FloatType type, int64_t B, int64_t T, int64_t V, int64_t pad, int threads, double tol) {
  using Acc = typename acc_type<In>::type;
  const int64_t row_stride = V + pad, rows = B * T;
  std::mt19937 gen(1234 + V);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::vector<In> logits(static_cast<size_t>(rows * row_stride));
  std::vector<std::vector<double>> rounded(rows, std::vector<double>(V));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < V; ++v) {
      logits[r * row_stride + v] = from_double<In>(normal(gen));
      rounded[r][v] = static_cast<double>(to_float(logits[r * row_stride + v]));
    }
  std::vector<int64_t> labels(rows);
  for (int64_t r = 0; r < rows; ++r) labels[r] = (r % 5 == 3) ? -100 : static_cast<int64_t>(gen() % V);

  std::vector<Acc> lp(rows, NAN), ent(rows, NAN), sc(rows, NAN), lse(rows, NAN);
  TokenStatsFwdParams p;
  p.logits = logits.data(), p.dtype = type;
  p.layout = {B, T, V, T * row_stride, row_stride};
  p.labels = labels.data(), p.labels_int64 = true, p.temperature = 0.8;
  p.logprobs = lp.data(), p.entropy = ent.data(), p.self_certainty = sc.data(), p.lse = lse.data();
  p.num_threads = threads;
  if (token_stats_fwd(p) != -1) {
    std::printf("FAIL valid labels reported out of range\n");
    ++failures;
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (labels[r] == -100) {
      expect_close(lp[r], 0, 0, "ignored logprob", r);
      continue;
    }
    const Reference ref = reference_row(rounded[r], labels[r], 0.8);
    expect_close(lp[r], ref.logprob, tol, "logprob", r);
    expect_close(ent[r], ref.entropy, tol, "entropy", r);
    expect_close(sc[r], ref.self_certainty, tol, "self_certainty", r);
  }

  // backward of sum(logprobs): (onehot - p) / T
  std::vector<In> grad(logits.size());
  std::vector<Acc> ones(rows, Acc(1));
  TokenStatsBwdParams q;
  q.grad_logits = grad.data(), q.grad_layout = p.layout;
  q.logits = logits.data(), q.dtype = type, q.layout = p.layout;
  q.labels = labels.data(), q.labels_int64 = true, q.temperature = 0.8;
  q.grad_logprobs = ones.data(), q.lse = lse.data(), q.num_threads = threads;
  token_stats_bwd(q);
  for (int64_t r = 0; r < rows; ++r) {
    const Reference ref = labels[r] == -100 ? Reference{} : reference_row(rounded[r], labels[r], 0.8);
    for (int64_t v = 0; v < V; v += std::max<int64_t>(1, V / 97)) {
      const double want = labels[r] == -100 ? 0.0
          : ((v == labels[r]) - std::exp(rounded[r][v] / 0.8 - ref.lse)) / 0.8;
      const double got = static_cast<double>(to_float(grad[r * row_stride + v]));
      if (!(std::fabs(got - want) <= 1e-2 * std::fabs(want) + 1e-6)) {
        std::printf("FAIL grad row %lld col %lld: got %.9g want %.9g\n", static_cast<long long>(r),
                    static_cast<long long>(v), got, want);
        ++failures;
      }
    }
  }

  // the same gradient block by block: columns [0, h) and [h, V) with vocab_offset / vocab_total
  std::vector<In> grad_blocks(logits.size());
  const int64_t h = V / 2;
  for (int64_t lo : {int64_t{0}, h}) {
    TokenStatsBwdParams b = q;
    const int64_t width = lo == 0 ? h : V - h;
    if (width == 0) continue;
    b.logits = logits.data() + lo, b.grad_logits = grad_blocks.data() + lo;
    b.layout.V = width, b.grad_layout.V = width;
    b.vocab_offset = lo, b.vocab_total = V;
    token_stats_bwd(b);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < V; ++v)
      if (to_float(grad_blocks[r * row_stride + v]) != to_float(grad[r * row_stride + v])) {
        std::printf("FAIL block-wise grad row %lld col %lld\n", static_cast<long long>(r), static_cast<long long>(v));
        ++failures;
        r = rows;
        break;
      }

  labels[rows - 1] = V;  // out of range: reported, never read
  if (token_stats_fwd(p) != rows - 1) {
    std::printf("FAIL out-of-range label not reported\n");
    ++failures;
  }
}

}  // namespace

int main() {
  const char* isas[] = {"base", "avx2", "avx512"};
  for (const char* isa : isas) {
    setenv("HOTLOOP_CPU_ISA", isa, 1);
    std::printf("isa %s\n", token_stats_isa());
    for (int threads : {1, 2}) {
      check<float>(FloatType::f32, 2, 3, 1000, 5, threads, 1e-5);
      check<float>(FloatType::f32, 1, 1, 50257, 0, threads, 1e-5);  // one long row: the vocabulary split
      check<double>(FloatType::f64, 2, 2, 333, 1, threads, 1e-12);
      check<bf16>(FloatType::bf16, 3, 2, 4097, 3, threads, 1e-5);
      check<f16>(FloatType::f16, 2, 2, 1, 0, threads, 1e-5);
    }
  }
  std::printf(failures == 0 ? "all token_stats checks passed\n" : "%d token_stats checks FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
