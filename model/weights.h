// The model's weights in the compute layout, and the one table that ties that layout to the
// Hugging Face checkpoint's tensor names.
//
// Compute layout (per layer):
//   attention: wq [q_size, hidden], wk/wv [kv_size, hidden] (split from query_key_value),
//              wo [hidden, q_size], q_norm/k_norm [head_dim]
//   dense MLP: w13 [2 * intermediate, hidden] (gate rows, then up rows), w2 [hidden, intermediate]
//   MoE:       router [num_experts, hidden] (F32: routing runs in fp32), expert_bias [num_experts],
//              experts_w13 [num_experts, 2 * moe_intermediate, hidden] (fused over experts),
//              experts_w2 [num_experts, hidden, moe_intermediate], shared expert as a dense MLP.
// Matrices are BF16 when the checkpoint's are (F16 or F32 checkpoints load as F32, exactly);
// norms and biases are F32.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "model/config.h"

namespace moeserve {

struct MlpWeights {
  HostTensor w13;  // [2 * width, hidden_size]
  HostTensor w2;   // [hidden_size, width]
};

struct AttentionWeights {
  HostTensor wq;      // [q_size, hidden_size]
  HostTensor wk;      // [kv_size, hidden_size]
  HostTensor wv;      // [kv_size, hidden_size]
  HostTensor wo;      // [hidden_size, q_size]
  HostTensor q_norm;  // F32 [head_dim]
  HostTensor k_norm;  // F32 [head_dim]
};

// The router of one MoE layer (mlp.gate): fp32, as routing runs in fp32.
struct RouterWeights {
  HostTensor weight;       // F32 [num_experts, hidden_size]
  HostTensor expert_bias;  // F32 [num_experts]; zeros when the config has no bias
};

struct MoeWeights {
  RouterWeights gate;
  HostTensor experts_w13;  // [num_experts, 2 * moe_intermediate_size, hidden_size]
  HostTensor experts_w2;   // [num_experts, hidden_size, moe_intermediate_size]
  MlpWeights shared;       // width shared_expert_width(); empty tensors when there is none
};

struct LayerWeights {
  HostTensor input_norm;           // F32 [hidden_size]
  HostTensor post_attention_norm;  // F32 [hidden_size]
  AttentionWeights attention;
  MlpWeights mlp;  // dense layers only
  MoeWeights moe;  // MoE layers only
};

struct ModelWeights {
  HostTensor embedding;  // [vocab_size, hidden_size]
  std::vector<LayerWeights> layers;
  HostTensor final_norm;  // F32 [hidden_size]
  HostTensor lm_head;     // [vocab_size, hidden_size]; empty when tie_word_embeddings

  const HostTensor& output_matrix() const { return lm_head.empty() ? embedding : lm_head; }
};

// Allocates a router; expert_bias zero-filled (it stays zero for configs without a bias).
RouterWeights AllocateRouter(const ModelConfig& config);

// Allocates (uninitialized) weights of `config`'s shape: matrices in `matrix_dtype`, the router,
// norms and biases in F32.
ModelWeights AllocateWeights(const ModelConfig& config, DType matrix_dtype);

// Where one checkpoint tensor's elements live in the compute layout: elements
// [src_offset, src_offset + count) of the tensor go to dst->data() + dst_offset.
struct TensorPart {
  HostTensor* dst = nullptr;
  int64_t dst_offset = 0;
  int64_t src_offset = 0;
  int64_t count = 0;
};

// One tensor of a Hugging Face LLaDA2 checkpoint.
struct TensorBinding {
  std::string name;               // e.g. "model.layers.3.mlp.experts.17.up_proj.weight"
  std::vector<int64_t> shape;     // as stored in the checkpoint
  std::string disk_dtype;         // what the real checkpoints store (and the writer writes)
  std::vector<TensorPart> parts;  // empty when no weights were given
  int64_t numel() const;
};

// Every tensor of a checkpoint of `config`, in a stable order, bound to `weights` (which must
// have been allocated for `config`) or unbound when `weights` is null.
std::vector<TensorBinding> BindCheckpointTensors(const ModelConfig& config, ModelWeights* weights);
// Only the routers' tensors (mlp.gate.weight and expert_bias of every MoE layer), bound to
// `routers` ([num_moe_layers], each from AllocateRouter).
std::vector<TensorBinding> BindRouterTensors(const ModelConfig& config,
                                             std::vector<RouterWeights>* routers);

// Parameters of the model: the sum of all checkpoint tensor sizes.
int64_t ParameterCount(const ModelConfig& config);

}  // namespace moeserve
