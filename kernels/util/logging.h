// A small leveled logger: `MOESERVE_LOG(INFO) << "loaded " << n << " tensors";`
//
// Lines look like `I1122 23:10:00.123456 loader.cc:42] message` (glog's layout, which log
// collectors already parse). Thread-safe: each line is formatted privately and written with one
// call. The minimum level is process-wide (SetMinLogLevel), default INFO.
#pragma once

#include <sstream>
#include <string_view>

namespace moeserve {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();
// Parses "debug", "info", "warning", "error"; false for anything else.
bool ParseLogLevel(std::string_view text, LogLevel* level);

namespace internal {
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};
}  // namespace internal

}  // namespace moeserve

#define MOESERVE_LOG_LEVEL_DEBUG ::moeserve::LogLevel::kDebug
#define MOESERVE_LOG_LEVEL_INFO ::moeserve::LogLevel::kInfo
#define MOESERVE_LOG_LEVEL_WARNING ::moeserve::LogLevel::kWarning
#define MOESERVE_LOG_LEVEL_ERROR ::moeserve::LogLevel::kError

#define MOESERVE_LOG(level)                                     \
  if (MOESERVE_LOG_LEVEL_##level < ::moeserve::MinLogLevel()) { \
  } else                                                        \
    ::moeserve::internal::LogMessage(MOESERVE_LOG_LEVEL_##level, __FILE__, __LINE__).stream()
