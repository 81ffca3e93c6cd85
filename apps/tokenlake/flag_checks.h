// CLI11 validators for the commands' numeric flags, with messages that say what is wanted:
// "--instances: must be an integer in [1, 4096], got '0'". (CLI11's own Range and
// PositiveNumber print their bounds as 300-digit doubles, and NaN passes them, since every
// comparison with it is false; CLI11 reads "nan" and "inf" as doubles.)
#ifndef TOKENLAKE_APPS_TOKENLAKE_FLAG_CHECKS_H_
#define TOKENLAKE_APPS_TOKENLAKE_FLAG_CHECKS_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"

namespace tokenlake::cli {

// An integer in [lo, hi].
inline CLI::Validator IntIn(int64_t lo, int64_t hi) {
  return CLI::Validator(
      [lo, hi](std::string& text) {
        int64_t v = 0;
        if (CLI::detail::lexical_cast(text, v) && v >= lo && v <= hi) return std::string();
        return hi == std::numeric_limits<int64_t>::max()
                   ? absl::StrFormat("must be an integer >= %d, got '%s'", lo, text)
                   : absl::StrFormat("must be an integer in [%d, %d], got '%s'", lo, hi, text);
      },
      hi == std::numeric_limits<int64_t>::max() ? absl::StrFormat("INT>=%d", lo)
                                                : absl::StrFormat("INT in [%d, %d]", lo, hi));
}

// An integer >= lo.
inline CLI::Validator IntAtLeast(int64_t lo) {
  return IntIn(lo, std::numeric_limits<int64_t>::max());
}

// A finite number > 0.
inline CLI::Validator Positive() {
  return CLI::Validator(
      [](std::string& text) {
        double v = 0;
        if (CLI::detail::lexical_cast(text, v) && std::isfinite(v) && v > 0) return std::string();
        return absl::StrFormat("must be a number > 0, got '%s'", text);
      },
      "NUMBER>0");
}

// A finite number >= 0.
inline CLI::Validator NonNegative() {
  return CLI::Validator(
      [](std::string& text) {
        double v = 0;
        if (CLI::detail::lexical_cast(text, v) && std::isfinite(v) && v >= 0) {
          return std::string();
        }
        return absl::StrFormat("must be a number >= 0, got '%s'", text);
      },
      "NUMBER>=0");
}

// A number in [lo, hi], or in (lo, hi] when `open_lo`.
inline CLI::Validator NumberIn(double lo, double hi, bool open_lo = false) {
  return CLI::Validator(
      [lo, hi, open_lo](std::string& text) {
        double v = 0;
        if (CLI::detail::lexical_cast(text, v) && (open_lo ? v > lo : v >= lo) && v <= hi) {
          return std::string();
        }
        return absl::StrFormat("must be a number in %c%g, %g], got '%s'", open_lo ? '(' : '[', lo,
                               hi, text);
      },
      absl::StrFormat("NUMBER in %c%g, %g]", open_lo ? '(' : '[', lo, hi));
}

}  // namespace tokenlake::cli

#endif  // TOKENLAKE_APPS_TOKENLAKE_FLAG_CHECKS_H_
