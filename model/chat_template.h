// The chat template of LLaDA2 / Ling (tokenizer_config.json's chat_template), rendered to the text
// that Tokenizer::Encode then turns into ids.
#pragma once

#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace moeserve {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// Renders the chat template of LLaDA2 / Ling (tokenizer_config.json's chat_template):
//   <role>SYSTEM</role>[first message's content + "\n" if it is a system message]
//   detailed thinking off<|role_end|>
//   then per message <role>HUMAN|SYSTEM|ASSISTANT</role>{content}<|role_end|> (user / system
//   after the first message / assistant), then <role>ASSISTANT</role> if add_generation_prompt.
// Errors: no messages ("messages: must not be empty", Jinja fails on messages[0] too), or a role
// other than system/user/assistant (naming messages[i].role).
absl::StatusOr<std::string> RenderChat(std::span<const ChatMessage> messages,
                                       bool add_generation_prompt);

}  // namespace moeserve
