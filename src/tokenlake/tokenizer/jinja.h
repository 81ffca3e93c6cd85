// The subset of Jinja that chat templates use, rendered as transformers' apply_chat_template
// renders it (trim_blocks, lstrip_blocks, loop controls, a single trailing newline dropped).
//
// Statements: text, {{ expr }}, {# comments #}, whitespace control ({%- -%} {{- -}} {%+),
// for (tuple targets, `if` filter, else, loop.index/index0/first/last/length/revindex/
// revindex0/previtem/nextitem), if/elif/else, set (names and namespace attributes), break,
// continue, generation (passed through).
// Expressions: literals (strings, numbers, booleans, none, lists, dicts), variables, attribute,
// index and slice access, + - * / // % ** ~, comparisons, in / not in, and / or / not,
// `a if c else b`, `is` tests (defined, undefined, none, string, number, integer, float,
// boolean, mapping, iterable, sequence, odd, even, true, false), filters (trim, length/count,
// tojson, upper, lower, first, last, join, default/d, string, list, replace, capitalize, abs,
// int, items, map(attribute=), selectattr / rejectattr), methods on strings (strip, lstrip,
// rstrip, upper, lower, startswith, endswith, split, replace) and dicts (items, keys, values,
// get), and the functions raise_exception, range, namespace and strftime_now.
// Anything else is refused when the template is parsed (or, for a name only known at run time
// such as a method, when rendered), with an error naming the construct and its line and column.
//
// Values are JSON values (insertion-ordered objects) plus Jinja's undefined; printing follows
// Python's str() (True, None, ['a', 1]) and tojson Python's json.dumps (", " and ": "
// separators, non-ASCII kept). upper/lower/capitalize change ASCII letters only.
//
// Thread-safety: a parsed Template is immutable; Render may run concurrently.
#ifndef TOKENLAKE_TOKENIZER_JINJA_H_
#define TOKENLAKE_TOKENIZER_JINJA_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace tokenlake::tokenizer::jinja {

using Json = nlohmann::ordered_json;

// Where a construct starts in the template source (1-based).
struct Pos {
  int line = 1;
  int column = 1;
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,  // value
    kName,     // name
    kList,     // items
    kDict,     // items as key, value pairs
    kAttr,     // items[0] . name
    kIndex,    // items[0] [ items[1] ]
    kSlice,    // items[0] [ items[1] : items[2] : items[3] ] (null items are absent)
    kCall,     // items[0] ( items[1..] ), kwarg_names for the trailing kwargs
    kFilter,   // items[0] | name ( items[1..] )
    kTest,     // items[0] is [not] name ( items[1..] )
    kUnary,    // op items[0]: "-", "+", "not"
    kBinary,   // items[0] op items[1]: arithmetic, comparisons, "in", "not in", "and", "or"
    kCond,     // items[1] if items[0] else items[2] (items[2] may be null)
  };
  Kind kind = Kind::kLiteral;
  Pos pos;
  Json value;
  std::string name;  // name, attribute, filter, test or operator
  bool negated = false;
  std::vector<ExprPtr> items;
  std::vector<std::string> kwarg_names;  // names of the last kwarg_names.size() call arguments
};

struct Node;
using NodeList = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class Kind {
    kText,    // text
    kOutput,  // {{ expr }}
    kFor,     // for targets in expr [if cond]: body [else: else_body]
    kIf,      // if expr: body else: else_body (elif chains nest in else_body)
    kSet,     // set targets[0][.attr] = expr
    kBreak,
    kContinue,
    kBlock,  // body (generation)
  };
  Kind kind = Kind::kText;
  Pos pos;
  std::string text;
  std::vector<std::string> targets;
  std::string attr;  // set ns.attr
  ExprPtr expr;
  ExprPtr cond;
  NodeList body;
  NodeList else_body;
};

// Names of the built-ins the subset has (the parser refuses others).
bool IsKnownFilter(std::string_view name);
bool IsKnownTest(std::string_view name);
bool IsKnownFunction(std::string_view name);
bool IsKnownMethod(std::string_view name);

// Bounds on one rendering, so that a template cannot hang or exhaust memory (real chat
// templates render in thousands of steps to kilobytes).
struct RenderLimits {
  // Statements executed plus loop iterations.
  int64_t max_steps = 1'000'000;
  // The output, and any string or list built on the way.
  size_t max_bytes = size_t{64} << 20;
};

class Template {
 public:
  // Parses `source`; `source_name` (a file name) prefixes every error.
  // Errors: InvalidArgument for a syntax error, Unimplemented for a construct outside the subset;
  // both name the line and column.
  static absl::StatusOr<Template> Parse(std::string_view source, const std::string& source_name);

  // Renders with `context`'s members as the template's variables (REQUIRES: an object).
  // Errors: InvalidArgument with the template's own message when it calls raise_exception, or
  // naming the line and column of an invalid operation (an undefined value's attribute, adding
  // a string to a number, an unknown method...) or the limit it ran into.
  absl::StatusOr<std::string> Render(const Json& context, const RenderLimits& limits = {}) const;

 private:
  std::shared_ptr<const NodeList> root_;
  std::string source_name_;
};

}  // namespace tokenlake::tokenizer::jinja

#endif  // TOKENLAKE_TOKENIZER_JINJA_H_
