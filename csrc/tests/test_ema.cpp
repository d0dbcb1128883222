// ctest: the EMA CPU kernel against double-precision math over a list of float32 tensors of odd sizes (empty ones
// included) split across threads mid-tensor, with and without a bf16 copy; decay 1 (target kept bit for bit)
// and 0 (target = online exactly); float64 tensors; an unsupported dtype pair is refused without writing.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/ema.h"

using namespace hotloop::cpu;

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void float32_list(double decay, bool with_copy, int threads) {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  const std::vector<int64_t> sizes = {70001, 0, 3, 65536, 129, 1};
  std::vector<std::vector<float>> t(sizes.size()), s(sizes.size());
  std::vector<std::vector<uint16_t>> c(sizes.size());
  std::vector<EmaTensor> items(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    t[i].resize(sizes[i]);
    s[i].resize(sizes[i]);
    c[i].assign(sizes[i], 0);
    for (auto& x : t[i]) x = nd(gen);
    for (auto& x : s[i]) x = nd(gen);
    items[i].target = t[i].data();
    items[i].online = s[i].data();
    items[i].copy = with_copy ? c[i].data() : nullptr;
    items[i].n = sizes[i];
  }
  const auto t0 = t, s0 = s;
  EmaParams p;
  p.tensors = items.data();
  p.count = int64_t(items.size());
  p.decay = decay;
  p.num_threads = threads;
  check(ema_update(p), "float32 list accepted");
  double err = 0, ref = 0;
  bool exact = true, copy_ok = true;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (int64_t k = 0; k < sizes[i]; ++k) {
      const double want = decay * t0[i][k] + (1 - decay) * s0[i][k];
      err += (t[i][k] - want) * (t[i][k] - want);
      ref += want * want;
      if (decay == 1.0) exact &= t[i][k] == t0[i][k];
      if (decay == 0.0) exact &= t[i][k] == s0[i][k];
      if (with_copy) copy_ok &= std::fabs(bf16_to_float(c[i][k]) - t[i][k]) <= std::fabs(t[i][k]) * (1.0f / 256);
    }
  }
  check(std::sqrt(err / ref) < 1e-6, "float32 lerp within 1e-6 of double math");
  check(exact, "decay 1 / 0 exact");
  check(copy_ok, "bf16 copy is the new target rounded");
}

void float64_and_refusal() {
  std::vector<double> t = {1.0, 2.0}, s = {3.0, 5.0};
  EmaTensor e;
  e.target = t.data();
  e.online = s.data();
  e.n = 2;
  e.target_dtype = e.online_dtype = FloatType::f64;
  EmaParams p;
  p.tensors = &e;
  p.count = 1;
  p.decay = 0.25;
  check(ema_update(p), "float64 accepted");
  check(t[0] == 0.25 * 1.0 + 0.75 * 3.0 && t[1] == 0.25 * 2.0 + 0.75 * 5.0, "float64 values");
  e.target_dtype = FloatType::bf16;  // (bf16, f64) is not a supported pair
  const std::vector<double> before = t;
  check(!ema_update(p), "unsupported pair refused");
  check(t == before, "nothing written when refused");
}

}  // namespace

int main() {
  for (int threads : {1, 2})
    for (double decay : {0.996, 0.3, 1.0, 0.0})
      for (bool copy : {false, true}) float32_list(decay, copy, threads);
  float64_and_refusal();
  if (failures == 0) std::printf("test_ema: all passed\n");
  return failures == 0 ? 0 : 1;
}
