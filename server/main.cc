// moeserve: the LLaDA2 MoE inference server and its offline commands.
//
//   moeserve [serve]            load the model (or the built-in random-weight demo) and serve
//   moeserve verify             check a checkpoint against golden reference outputs
//   moeserve write-checkpoint   write a random-weight checkpoint in the Hugging Face layout
//   moeserve route-stats        routing load statistics of every MoE layer
//   moeserve generate           generate from --prompt offline and print the statistics
//   moeserve tokenize           JSON lines of text to ids (or back with --decode)
//
// Flags are shared by all commands; `moeserve --help` lists them.
#include <signal.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "kernels/util/logging.h"
#include "server/commands.h"

ABSL_FLAG(std::string, log_level, "info", "Minimum log level: debug, info, warning or error.");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "LLaDA2 MoE inference server.\n"
      "usage: moeserve [serve|verify|write-checkpoint|route-stats|generate|tokenize] [--flags]\n"
      "  serve             load --model_dir (or the built-in random-weight demo model) and serve\n"
      "                    gRPC on --port until SIGTERM/SIGINT (then drain and exit 0)\n"
      "  verify            compare --model_dir against the reference outputs in --golden_dir\n"
      "  write-checkpoint  write a random-weight checkpoint of --config (or the demo) to "
      "--out_dir\n"
      "  route-stats       routing load per MoE layer over --tokens random tokens\n"
      "  generate          generate from --prompt offline; print the text and statistics\n"
      "  tokenize          stdin {\"text\": ...} lines to {\"ids\": [...]} lines (--decode: "
      "the reverse), with --tokenizer or the demo's byte-level tokenizer");
  // Block the shutdown signals before any thread starts; the serve loop waits for them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  moeserve::LogLevel level;
  if (!moeserve::ParseLogLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    std::fprintf(stderr, "--log_level: unknown level \"%s\" (debug, info, warning, error)\n",
                 absl::GetFlag(FLAGS_log_level).c_str());
    return 2;
  }
  moeserve::SetMinLogLevel(level);
  if (args.size() > 2) {
    std::fprintf(stderr, "unexpected argument \"%s\"; see moeserve --help\n", args[2]);
    return 2;
  }
  const std::string command = args.size() > 1 ? args[1] : "serve";
  if (command == "serve") return moeserve::RunServe(signals);
  if (command == "verify") return moeserve::RunVerify();
  if (command == "write-checkpoint") return moeserve::RunWriteCheckpoint();
  if (command == "route-stats") return moeserve::RunRouteStats();
  if (command == "generate") return moeserve::RunGenerate();
  if (command == "tokenize") return moeserve::RunTokenize();
  std::fprintf(stderr, "unknown command \"%s\"; see moeserve --help\n", command.c_str());
  return 2;
}
