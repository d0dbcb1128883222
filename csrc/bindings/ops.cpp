// The one TORCH_LIBRARY of hotloop: every kernel-level schema, plus the Python module hotloop._C.
// The public ops (hotloop::token_stats_fwd, ...) are torch.library custom ops defined in Python with fake
// kernels and autograd; they call these per-backend kernels, so backends can be forced per call.
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(hotloop, m) {
  // logits [B, T, V] (stride(2) == 1, any leading strides), labels [B, T] contiguous int32/int64.
  // -> (logprobs, entropy or [0], self_certainty or [0], lse), each [B, T] float32 (float64 for float64 logits).
  for (const char* backend : {"cpu", "cuda"}) {
    m.def((std::string("token_stats_fwd_") + backend +
           "(Tensor logits, Tensor labels, float temperature, int ignore_index, bool entropy, "
           "bool self_certainty) -> (Tensor, Tensor, Tensor, Tensor)").c_str());
  }
  // Writes d loss / d logits into grad_logits [B, T, V] (stride(2) == 1; may be logits itself).
  // grad_* [B, T] contiguous in the forward's output dtype; absent grads are None.
  m.def("token_stats_bwd_cuda(Tensor(a!) grad_logits, Tensor? grad_logprobs, Tensor? grad_entropy, "
        "Tensor? grad_self_certainty, Tensor logits, Tensor labels, Tensor lse, Tensor? entropy, float temperature, "
        "int ignore_index) -> ()");
  // The CPU one also takes a block of vocabulary columns [vocab_offset, vocab_offset + V) of vocab_total
  // (0 = V): the fused linear path's backward goes block by block.
  m.def("token_stats_bwd_cpu(Tensor(a!) grad_logits, Tensor? grad_logprobs, Tensor? grad_entropy, "
        "Tensor? grad_self_certainty, Tensor logits, Tensor labels, Tensor lse, Tensor? entropy, float temperature, "
        "int ignore_index, int vocab_offset=0, int vocab_total=0) -> ()");
  // dst [r, c] = src^T (accumulate: dst += src^T), src [c, r]; unit stride along the last dims. dtypes equal, or
  // bfloat16 / float16 src into a float32 dst. The fused linear paths' d_weight tiles (cpu/transpose.h).
  m.def("transpose_add_cpu(Tensor(a!) dst, Tensor src, bool accumulate) -> ()");
  // Group-relative advantages (SPEC §3). rewards [R] contiguous float; exactly one of group_size > 0 (fixed
  // groups of adjacent responses, R % group_size == 0) and group_index [R] int32/int64 in [0, R) (ragged).
  // kind: grpo | dr_grpo | rloo | reinforce_pp_baseline | passk; scale (grpo): group | batch | none.
  // -> advantages [R] float32 (float64 for float64 rewards).
  m.def("group_advantages_cpu(Tensor rewards, Tensor? group_index, int group_size, str kind, str scale, "
        "float eps) -> Tensor");
  // Per-token contracts of the policy loss (SPEC §4) and the NFT loss (SPEC §5): policy_tokens_ref /
  // nft_tokens_ref in python/hotloop/reference/policy_loss.py. Every tensor contiguous [N], all float32 or all
  // float64; outputs in that dtype. kl_kind: 0 none, 1 k1, 2 k2, 3 k3 (kld given exactly when != 0);
  // dual_clip <= 0 is off. -> g_lr [N], g_kl [N] ([0] without kl), sums [6] (loss, clip_low count, clip_high
  // count, dual count, ratio sum, kl sum), all over tokens with m != 0.
  m.def("policy_tokens_cpu(Tensor lr, Tensor? kld, Tensor adv, Tensor m, Tensor w, float clip_low, "
        "float clip_high, float dual_clip, int kl_kind, float kl_coef) -> (Tensor g_lr, Tensor g_kl, Tensor sums)");
  // r: r_q of the token's group; c: 1 correct / 0 not. -> g_lr [N], sums [3] (loss, ratio sum, clamped count).
  m.def("nft_tokens_cpu(Tensor lr, Tensor m, Tensor w, Tensor r, Tensor c, float clamp_negative) "
        "-> (Tensor g_lr, Tensor sums)");
  // Per-pair contracts of the preference losses (SPEC §6) and KTO: preference_pairs_ref / kto_items_ref in
  // python/hotloop/reference/preference_loss.py. Every tensor contiguous [B], all float32 or all float64.
  // kind: index into KINDS there (0 sigmoid ... 11 cream); lengths already >= 1.
  // -> per-pair loss, d loss / d x_w, d loss / d x_l, d loss / d nll, each [B].
  m.def("preference_pairs_cpu(Tensor x_w, Tensor x_l, Tensor r_w, Tensor r_l, Tensor len_w, Tensor len_l, "
        "Tensor c, Tensor nll, int kind, float beta, float label_smoothing, float gamma) "
        "-> (Tensor loss, Tensor g_w, Tensor g_l, Tensor g_nll)");
  // d: 1 desirable / 0 undesirable; kl: one element, already clamped >= 0. -> per-item loss, d loss / d x, [B].
  m.def("kto_items_cpu(Tensor x, Tensor r, Tensor d, Tensor kl, float beta, float desirable_weight, "
        "float undesirable_weight) -> (Tensor loss, Tensor g)");
  // EMA of a model (SPEC §7): target[i] <- d * target[i] + (1 - d) * online[i] for every i in one pass (one
  // launch on CUDA); copy (empty, or one per target) receives the new target in its own dtype. Contiguous
  // tensors; (target, online) dtypes (f32, f32|bf16|f16), (bf16, bf16), (f16, f16), (f64, f64) on CPU.
  // decay_tensor (one float32 element, on the targets' device) overrides decay; read on device by CUDA.
  for (const char* backend : {"cpu", "cuda"}) {
    m.def((std::string("ema_update_") + backend +
           "(Tensor(a!)[] target, Tensor[] online, Tensor(b!)[] copy, float decay, Tensor? decay_tensor) -> ()")
              .c_str());
  }
  // DINO loss (SPEC §7): student [n_crops * B, K], teacher [n_global * B, K] (crop-major rows), center [K]
  // float32, all contiguous; -> (loss [] float32 (float64 for float64), d loss / d student (student's shape and
  // dtype; [0] when need_grad is false)).
  m.def("dino_loss_cpu(Tensor student, Tensor teacher, Tensor center, int n_global, float tau_s, float tau_t, "
        "bool need_grad) -> (Tensor loss, Tensor grad_student)");
  // k nearest neighbours (SPEC §8): queries [Q, d], keys [M, d], one dtype (f32 | bf16 | f16), 1 <= k <= M,
  // metric l2 | ip | cosine, valid [M] bool or None. -> (scores [Q, k] float32: squared L2 ascending, or
  // inner product / cosine descending; indices [Q, k] int64, -1 padding when fewer than k keys are valid).
  // query_block / key_block: tile sizes (0 = automatic), for tests that need many tiles at small shapes.
  for (const char* backend : {"cpu", "cuda"}) {
    m.def((std::string("knn_") + backend +
           "(Tensor queries, Tensor keys, int k, str metric, Tensor? valid, int query_block=0, int key_block=0) "
           "-> (Tensor, Tensor)").c_str());
  }
}

static bool built_with_cuda() {
#ifdef HOTLOOP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hotloop compiled kernels (registered as torch.ops.hotloop.*)";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
}
