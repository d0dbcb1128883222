// ctest: the group_advantages CPU kernel against a plain double-precision computation group by group, for every
// kind (and grpo scale), fixed and ragged groups (int32 and int64 ids), singleton and zero-variance groups,
// float and double rewards, sizes below and above the kernel's threading threshold, one and two threads.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <vector>

#include "cpu/group_advantages.h"

using namespace hotloop::cpu;

namespace {

int failures = 0;

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}

// unbiased; 0 under two values
double std_of(const std::vector<double>& v) {
  if (v.size() < 2) return 0.0;
  const double mu = mean_of(v);
  double ss = 0;
  for (double x : v) ss += (x - mu) * (x - mu);
  return std::sqrt(ss / double(v.size() - 1));
}

// docs/group_advantages.md group by group: advantages of rewards r whose response i is in group gid[i].
std::vector<double> reference(const std::vector<double>& r, const std::vector<int64_t>& gid, AdvantageKind kind,
                              AdvantageScale scale, double eps) {
  std::map<int64_t, std::vector<int64_t>> groups;
  for (size_t i = 0; i < r.size(); ++i) groups[gid[i]].push_back(int64_t(i));
  const double batch_std = std_of(r);
  std::vector<double> a(r.size(), 0.0);
  for (const auto& [g, members] : groups) {
    std::vector<double> v;
    for (int64_t i : members) v.push_back(r[i]);
    const double n = double(v.size()), mu = mean_of(v), sd = std_of(v);
    for (int64_t i : members) {
      const double d = r[i] - mu;
      switch (kind) {
        case AdvantageKind::grpo:
          a[i] = scale == AdvantageScale::group ? (v.size() > 1 ? d / (sd + eps) : d)
                 : scale == AdvantageScale::batch ? d / (batch_std + eps)
                                                  : d;
          break;
        case AdvantageKind::rloo: a[i] = v.size() > 1 ? d * n / (n - 1) : d; break;
        case AdvantageKind::passk: a[i] = 0.0; break;
        default: a[i] = d;  // dr_grpo, reinforce_pp_baseline (whitened below)
      }
    }
    if (kind == AdvantageKind::passk && v.size() > 1) {
      const size_t best = size_t(std::max_element(v.begin(), v.end()) - v.begin());  // first max
      double runner_up = -INFINITY;
      for (size_t j = 0; j < v.size(); ++j)
        if (j != best) runner_up = std::max(runner_up, v[j]);
      a[members[best]] = v[best] - runner_up;
    }
  }
  if (kind == AdvantageKind::reinforce_pp_baseline) {
    const double mu = mean_of(a), sd = std_of(a);
    for (double& x : a) x = (x - mu) / (sd + eps);
  }
  return a;
}

struct Case {
  const char* name;
  AdvantageKind kind;
  AdvantageScale scale;
};

const Case kCases[] = {
    {"grpo/group", AdvantageKind::grpo, AdvantageScale::group},
    {"grpo/batch", AdvantageKind::grpo, AdvantageScale::batch},
    {"grpo/none", AdvantageKind::grpo, AdvantageScale::none},
    {"dr_grpo", AdvantageKind::dr_grpo, AdvantageScale::group},
    {"rloo", AdvantageKind::rloo, AdvantageScale::group},
    {"reinforce_pp_baseline", AdvantageKind::reinforce_pp_baseline, AdvantageScale::group},
    {"passk", AdvantageKind::passk, AdvantageScale::group},
};

// Rewards rounded to T (the kernel reads T); group 1 has zero variance, group 2 a tie for its max.
template <class T> std::vector<double> make_rewards(int64_t R, int64_t G, std::mt19937& gen) {
  std::normal_distribution<double> normal(0.5, 2.0);
  std::vector<double> r(R);
  for (int64_t i = 0; i < R; ++i) r[i] = double(T(normal(gen)));
  for (int64_t i = G; i < std::min(R, 2 * G); ++i) r[i] = 1.5;
  if (R >= 3 * G && G >= 2) r[2 * G] = r[2 * G + 1] = 9.0;
  return r;
}

// Runs the kernel with fixed groups (group_size = G, ids unused) or ragged ids, compares with the reference.
template <class T, class Out, class I>
void run_case(FloatType type, const std::vector<double>& r, int64_t G, const std::vector<int64_t>& gid,
              const Case& c, int threads, double tol, const char* layout) {
  const int64_t R = int64_t(r.size());
  const std::vector<T> rewards(r.begin(), r.end());
  const std::vector<I> idx(gid.begin(), gid.end());
  std::vector<Out> out(R, Out(NAN));
  GroupAdvantagesParams p;
  p.rewards = rewards.data(), p.dtype = type, p.R = R;
  p.group_size = G, p.group_index = G > 0 ? nullptr : idx.data(), p.index_int64 = sizeof(I) == 8;
  p.kind = c.kind, p.scale = c.scale, p.eps = 1e-6;
  p.out = out.data(), p.num_threads = threads;
  if (group_advantages(p) != -1) {
    std::printf("FAIL %s %s R=%lld: valid ids reported out of range\n", c.name, layout, (long long)R);
    ++failures;
    return;
  }
  const std::vector<double> want = reference(r, gid, c.kind, c.scale, p.eps);
  for (int64_t i = 0; i < R; ++i) {
    const double err = std::fabs(double(out[i]) - want[i]) / std::max(1.0, std::fabs(want[i]));
    if (!(err <= tol)) {
      std::printf("FAIL %s %s R=%lld threads=%d [%lld]: got %.12g want %.12g\n", c.name, layout, (long long)R,
                  threads, (long long)i, double(out[i]), want[i]);
      ++failures;
      return;
    }
  }
}

template <class T, class Out> void check(FloatType type, int64_t R, int64_t G, double tol) {
  std::mt19937 gen(unsigned(R * 31 + G));
  const std::vector<double> r = make_rewards<T>(R, G, gen);
  std::vector<int64_t> fixed(R), ragged(R);
  for (int64_t i = 0; i < R; ++i) fixed[i] = i / G;
  // ragged: the same zero-variance and tie groups, then random sizes 1..2G (singletons included), ids scattered
  // over [0, R) and responses shuffled
  std::vector<int64_t> ids(R);
  for (int64_t i = 0; i < R; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), gen);
  std::uniform_int_distribution<int64_t> size(1, 2 * G);
  for (int64_t i = 0, g = 0; i < R; ++g) {
    const int64_t n = i < 3 * G ? G : size(gen);
    for (int64_t j = i; j < std::min(R, i + n); ++j) ragged[j] = ids[g];
    i += n;
  }
  ragged[R - 1] = ids[R - 1];  // a singleton, with an id no other response uses
  std::vector<int64_t> perm(R);
  for (int64_t i = 0; i < R; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), gen);
  std::vector<double> r_shuffled(R);
  std::vector<int64_t> ragged_shuffled(R);
  for (int64_t i = 0; i < R; ++i) r_shuffled[i] = r[perm[i]], ragged_shuffled[i] = ragged[perm[i]];
  for (const Case& c : kCases)
    for (int threads : {1, 2}) {
      run_case<T, Out, int64_t>(type, r, G, fixed, c, threads, tol, "fixed");
      run_case<T, Out, int64_t>(type, r_shuffled, 0, ragged_shuffled, c, threads, tol, "ragged/int64");
      run_case<T, Out, int32_t>(type, r_shuffled, 0, ragged_shuffled, c, threads, tol, "ragged/int32");
    }
}

void check_out_of_range_id() {
  const std::vector<float> r = {1, 2, 3, 4};
  const std::vector<int64_t> ids = {0, 1, 4, 1};  // 4 is outside [0, R)
  std::vector<float> out(4);
  GroupAdvantagesParams p;
  p.rewards = r.data(), p.R = 4, p.group_index = ids.data(), p.out = out.data();
  if (group_advantages(p) != 2) {
    std::printf("FAIL out-of-range group id not reported at position 2\n");
    ++failures;
  }
}

}  // namespace

int main() {
  for (int64_t G : {1, 4, 16}) {
    check<float, float>(FloatType::f32, 12 * G, G, 1e-6);
    check<double, double>(FloatType::f64, 12 * G, G, 1e-12);
  }
  // past the kernel's threading threshold (2^15 responses)
  check<float, float>(FloatType::f32, 40000, 8, 1e-6);
  check<double, double>(FloatType::f64, 40000, 8, 1e-12);
  check_out_of_range_id();
  std::printf(failures == 0 ? "all group_advantages checks passed\n" : "%d group_advantages checks FAILED\n",
              failures);
  return failures == 0 ? 0 : 1;
}
