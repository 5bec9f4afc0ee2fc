#include "model/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moeserve {

absl::StatusOr<std::string> RenderChat(std::span<const ChatMessage> messages,
                                       bool add_generation_prompt) {
  if (messages.empty()) return absl::InvalidArgumentError("messages: must not be empty");
  std::string out = "<role>SYSTEM</role>";
  if (messages[0].role == "system") absl::StrAppend(&out, messages[0].content, "\n");
  out += "detailed thinking off<|role_end|>";
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      absl::StrAppend(&out, "<role>HUMAN</role>", m.content, "<|role_end|>");
    } else if (m.role == "system") {
      if (i > 0) absl::StrAppend(&out, "<role>SYSTEM</role>", m.content, "<|role_end|>");
    } else if (m.role == "assistant") {
      absl::StrAppend(&out, "<role>ASSISTANT</role>", m.content, "<|role_end|>");
    } else {
      const std::string role =
          nlohmann::json(m.role).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i, "].role: unknown role ", role,
                       " (expected \"system\", \"user\" or \"assistant\")"));
    }
  }
  if (add_generation_prompt) out += "<role>ASSISTANT</role>";
  return out;
}

}  // namespace moeserve
