// Status propagation macros used across TokenLake.
//
//   TOKENLAKE_RETURN_IF_ERROR(expr);            // returns expr's status if it is not OK
//   TOKENLAKE_ASSIGN_OR_RETURN(auto x, expr);   // x = *expr, or returns expr.status()
//
// Both work in functions returning absl::Status or absl::StatusOr<T>. StatusWithPrefix says
// who reports an error that a shared check found ("Generate: " + ...).
#ifndef TOKENLAKE_BASE_STATUS_MACROS_H_
#define TOKENLAKE_BASE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

#define TOKENLAKE_RETURN_IF_ERROR(expr)                    \
  do {                                                     \
    ::absl::Status tokenlake_status_ = (expr);             \
    if (!tokenlake_status_.ok()) return tokenlake_status_; \
  } while (0)

#define TOKENLAKE_STATUS_CONCAT_INNER_(a, b) a##b
#define TOKENLAKE_STATUS_CONCAT_(a, b) TOKENLAKE_STATUS_CONCAT_INNER_(a, b)

#define TOKENLAKE_ASSIGN_OR_RETURN(lhs, expr)                                                    \
  TOKENLAKE_ASSIGN_OR_RETURN_IMPL_(TOKENLAKE_STATUS_CONCAT_(tokenlake_statusor_, __LINE__), lhs, \
                                   expr)

#define TOKENLAKE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                     \
  if (!statusor.ok()) return std::move(statusor).status();    \
  lhs = std::move(statusor).value()

namespace tokenlake {

// `status` with its message prefixed by `prefix` (OK stays OK).
inline absl::Status StatusWithPrefix(const absl::Status& status, absl::string_view prefix) {
  if (status.ok()) return status;
  return {status.code(), absl::StrCat(prefix, status.message())};
}

}  // namespace tokenlake

#endif  // TOKENLAKE_BASE_STATUS_MACROS_H_
