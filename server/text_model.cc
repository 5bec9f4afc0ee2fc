#include "server/text_model.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"
#include "model/checkpoint.h"

namespace moeserve {

absl::StatusOr<TextModel> LoadTextModel(const TextModelOptions& options) {
  const std::string& model_dir = options.model_dir;
  const std::string& tokenizer_path = options.tokenizer_path;
  TextModel out;
  if (model_dir.empty()) {
    MOESERVE_LOG(WARNING) << "****************************************************************";
    MOESERVE_LOG(WARNING) << "* No --model_dir given: this is the BUILT-IN RANDOM-WEIGHT DEMO   *";
    MOESERVE_LOG(WARNING) << "* model with a byte-level tokenizer. Its output is noise; use it  *";
    MOESERVE_LOG(WARNING) << "* to try the API, the routing modes and the metrics only.         *";
    MOESERVE_LOG(WARNING) << "****************************************************************";
    ModelConfig config = DemoModelConfig();
    if (!options.demo_config.empty()) {
      ASSIGN_OR_RETURN(config, LoadModelConfig(options.demo_config));
      MOESERVE_LOG(WARNING) << "demo model in the shape of " << options.demo_config << " ("
                            << ParameterCount(config) / 1e9 << " B parameters)";
    }
    ASSIGN_OR_RETURN(
        out.model,
        Model::Create(config, RandomWeights(config, {.seed = options.demo_seed}), options.model));
    out.name = "demo";
    out.random_weights = true;
  } else {
    MOESERVE_LOG(INFO) << "loading checkpoint " << model_dir;
    ASSIGN_OR_RETURN(out.model, Model::Load(model_dir, options.model));
    out.name = std::filesystem::path(model_dir).lexically_normal().filename().string();
    if (out.name.empty()) {
      out.name = std::filesystem::path(model_dir).lexically_normal().parent_path().filename();
    }
  }
  std::string path = tokenizer_path;
  if (path.empty() && !model_dir.empty()) path = model_dir + "/tokenizer.json";
  if (path.empty()) {
    out.tokenizer = Tokenizer::ByteLevelDemo();
  } else {
    auto tokenizer = Tokenizer::Load(path);
    if (!tokenizer.ok()) {
      return absl::Status(tokenizer.status().code(),
                          absl::StrCat("tokenizer ", path, ": ", tokenizer.status().message(),
                                       tokenizer_path.empty() ? " (pass --tokenizer)" : ""));
    }
    out.tokenizer = *std::move(tokenizer);
  }
  if (out.tokenizer->vocab_size() > out.model->config().vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("the tokenizer has ", out.tokenizer->vocab_size(),
                     " tokens, more than the model's vocab_size ", out.model->config().vocab_size));
  }
  return out;
}

absl::StatusOr<EngineOptions> MakeEngineOptions(const Tokenizer& tokenizer,
                                                int64_t max_batch_tokens) {
  EngineOptions options;
  const std::optional<int32_t> mask = tokenizer.mask_id();
  if (!mask.has_value()) {
    return absl::InvalidArgumentError(
        "the tokenizer has no <|mask|> token; a diffusion model needs one");
  }
  options.mask_id = *mask;
  for (std::optional<int32_t> id : {tokenizer.eos_id(), tokenizer.role_end_id()}) {
    if (id.has_value()) options.stop_ids.push_back(*id);
  }
  options.max_batch_tokens = max_batch_tokens;
  options.num_generatable_ids = tokenizer.vocab_size();
  options.detokenize = [&tokenizer](std::span<const int32_t> ids) {
    return tokenizer.Decode(ids, /*skip_special_tokens=*/true);
  };
  return options;
}

void LogModelSummary(const TextModel& m) {
  const ModelConfig& c = m.model->config();
  MOESERVE_LOG(INFO) << absl::StrFormat(
      "model %s%s on %s: %s, %.3f B parameters, %d layers (%d dense, %d MoE), hidden %d, %d "
      "experts "
      "(top-%d, %d groups / top-%d), expert width %d, %d shared, vocab %d, context %d; tokenizer "
      "%d tokens",
      m.name, m.random_weights ? " (RANDOM WEIGHTS)" : "", DeviceName(m.model->device()),
      c.model_type, ParameterCount(c) / 1e9, c.num_hidden_layers, c.first_k_dense_replace,
      c.num_moe_layers(), c.hidden_size, c.num_experts, c.num_experts_per_tok, c.n_group,
      c.topk_group, c.moe_intermediate_size, c.num_shared_experts, c.vocab_size,
      c.max_position_embeddings, m.tokenizer->vocab_size());
}

}  // namespace moeserve
