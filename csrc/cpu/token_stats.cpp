// Picks the token_stats kernel compiled for the best instruction set this CPU has.
#include "token_stats.h"

#include "isa.h"

namespace hotloop::cpu {

HOTLOOP_ISA_DECLARE(int64_t token_stats_fwd(const TokenStatsFwdParams& p))
HOTLOOP_ISA_DECLARE(void token_stats_bwd(const TokenStatsBwdParams& p))

int64_t token_stats_fwd(const TokenStatsFwdParams& p) { return HOTLOOP_ISA_PICK(token_stats_fwd)(p); }

void token_stats_bwd(const TokenStatsBwdParams& p) { HOTLOOP_ISA_PICK(token_stats_bwd)(p); }

const char* token_stats_isa() { return isa_name(runtime_isa()); }

}  // namespace hotloop::cpu
