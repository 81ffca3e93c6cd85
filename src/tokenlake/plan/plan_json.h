// JSON (de)serialisation of plans, with nlohmann::json. Enums are written by name
// ("move_queries"), ids as integers (invalid ids as null).
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_PLAN_PLAN_JSON_H_
#define TOKENLAKE_PLAN_PLAN_JSON_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"
#include "tokenlake/plan/plan_types.h"

namespace tokenlake::plan {

nlohmann::json ToJson(const BatchPlan& plan);
// Errors: InvalidArgument naming the missing or mistyped field.
absl::StatusOr<BatchPlan> BatchPlanFromJson(const nlohmann::json& json);

// A JSON array of plans, compact.
std::string SerializePlans(absl::Span<const BatchPlan> plans);
// Errors: InvalidArgument for malformed JSON or a bad plan (the message says where).
absl::StatusOr<std::vector<BatchPlan>> ParsePlans(std::string_view text);

}  // namespace tokenlake::plan

#endif  // TOKENLAKE_PLAN_PLAN_JSON_H_
