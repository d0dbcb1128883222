// Picks the token_stats kernel compiled for the best instruction set this CPU has.
#include "token_stats.h"

#include "isa.h"

namespace hotloop::cpu {

#define HOTLOOP_DECLARE_ISA(ns)                                \
  namespace ns {                                               \
  int64_t token_stats_fwd(const TokenStatsFwdParams& p);       \
  void token_stats_bwd(const TokenStatsBwdParams& p);          \
  }
HOTLOOP_DECLARE_ISA(base)
#if defined(__x86_64__)
HOTLOOP_DECLARE_ISA(avx2)
HOTLOOP_DECLARE_ISA(avx512)
#endif
#undef HOTLOOP_DECLARE_ISA

int64_t token_stats_fwd(const TokenStatsFwdParams& p) {
  switch (runtime_isa()) {
#if defined(__x86_64__)
    case Isa::avx512: return avx512::token_stats_fwd(p);
    case Isa::avx2: return avx2::token_stats_fwd(p);
#endif
    default: return base::token_stats_fwd(p);
  }
}

void token_stats_bwd(const TokenStatsBwdParams& p) {
  switch (runtime_isa()) {
#if defined(__x86_64__)
    case Isa::avx512: return avx512::token_stats_bwd(p);
    case Isa::avx2: return avx2::token_stats_bwd(p);
#endif
    default: return base::token_stats_bwd(p);
  }
}

const char* token_stats_isa() { return isa_name(runtime_isa()); }

}  // namespace hotloop::cpu
