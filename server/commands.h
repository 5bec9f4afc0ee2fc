// The commands of the moeserve binary. Each returns the process exit code.
#pragma once

#include <signal.h>

namespace moeserve {

// Loads the model and serves until SIGINT or SIGTERM (which the caller has blocked in `signals`).
int RunServe(const sigset_t& signals);
// Checks --model_dir against --golden_dir; exits non-zero when any case is out of tolerance.
int RunVerify();
// Prints routing load statistics of every MoE layer (see model/route_stats.h).
int RunRouteStats();
// Writes a random-weight checkpoint.
int RunWriteCheckpoint();
// Generates from --prompt offline and prints the text and the decoding statistics.
int RunGenerate();
// JSON lines on stdin to JSON lines on stdout: {"text"} to {"ids"}, or the reverse with --decode.
int RunTokenize();

}  // namespace moeserve
