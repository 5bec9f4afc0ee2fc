// Status propagation helpers used across every library boundary (absl::Status, no exceptions).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOESERVE_CONCAT_INNER_(a, b) a##b
#define MOESERVE_CONCAT_(a, b) MOESERVE_CONCAT_INNER_(a, b)

// Returns from the current function when `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                            \
  do {                                                   \
    ::absl::Status _moeserve_status = (expr);            \
    if (!_moeserve_status.ok()) return _moeserve_status; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());`: evaluates a StatusOr, returns its status on error,
// otherwise moves the value into `lhs`.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(MOESERVE_CONCAT_(_moeserve_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr)   \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return std::move(tmp).status(); \
  lhs = std::move(tmp).value()
