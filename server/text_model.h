// A model with its tokenizer, as the serve and generate commands load it: a Hugging Face
// checkpoint directory, or the built-in random-weight demo (with the built-in byte-level
// tokenizer) when none is given.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/decoder.h"
#include "model/model.h"
#include "model/tokenizer.h"

namespace moeserve {

struct TextModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string name;  // the checkpoint directory's name, or "demo"
  bool random_weights = false;
};

struct TextModelOptions {
  std::string model_dir;       // empty: the demo (loudly logged as random weights)
  std::string tokenizer_path;  // empty: the checkpoint's tokenizer.json (or the demo's)
  uint64_t demo_seed = 0;
  std::string demo_config;  // the demo's config.json; empty: DemoModelConfig()
  ModelOptions model;       // the device
};
absl::StatusOr<TextModel> LoadTextModel(const TextModelOptions& options);

// Engine options from the tokenizer's special tokens: the mask id, the stop ids (eos, and the
// role-end token when it has one), detokenization for stop strings.
absl::StatusOr<EngineOptions> MakeEngineOptions(const Tokenizer& tokenizer,
                                                int64_t max_batch_tokens);

void LogModelSummary(const TextModel& model);

}  // namespace moeserve
