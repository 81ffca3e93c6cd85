// TOKENLAKE_CHECK: assertions for programmer errors only (a broken invariant, a precondition the
// caller must guarantee). Never use it on input from files, the network or configuration: those
// get an absl::Status. Active in every build type; prints file, line, condition and an optional
// message, then aborts.
#ifndef TOKENLAKE_BASE_CHECK_H_
#define TOKENLAKE_BASE_CHECK_H_

#include <string_view>

namespace tokenlake::base_internal {
[[noreturn]] void CheckFailed(const char* file, int line, const char* condition,
                              std::string_view message);
}  // namespace tokenlake::base_internal

#define TOKENLAKE_CHECK(condition, ...)                                            \
  do {                                                                             \
    if (!(condition)) [[unlikely]] {                                               \
      ::tokenlake::base_internal::CheckFailed(__FILE__, __LINE__, #condition,      \
                                              ::std::string_view{"" __VA_ARGS__}); \
    }                                                                              \
  } while (0)

#define TOKENLAKE_CHECK_OK(expr)                                                   \
  do {                                                                             \
    const auto& tokenlake_check_status_ = (expr);                                  \
    if (!tokenlake_check_status_.ok()) [[unlikely]] {                              \
      ::tokenlake::base_internal::CheckFailed(__FILE__, __LINE__, #expr " is OK",  \
                                              tokenlake_check_status_.ToString()); \
    }                                                                              \
  } while (0)

#ifndef NDEBUG
#define TOKENLAKE_DCHECK(condition, ...) TOKENLAKE_CHECK(condition, __VA_ARGS__)
#else
#define TOKENLAKE_DCHECK(condition, ...) \
  do {                                   \
  } while (false && (condition))
#endif

#endif  // TOKENLAKE_BASE_CHECK_H_
