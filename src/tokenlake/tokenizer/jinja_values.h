// Python's behaviour for the Jinja evaluator (jinja_eval.cc): str(), repr(), json.dumps, float
// formatting, str.strip, equality across int / float / bool. Internal to the tokenizer module.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_TOKENIZER_JINJA_VALUES_H_
#define TOKENLAKE_TOKENIZER_JINJA_VALUES_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tokenlake/tokenizer/jinja.h"

namespace tokenlake::tokenizer::jinja {

// Python's repr(float): the shortest digits that round-trip; exponent form outside 1e-4..1e16.
std::string PyFloat(double d);
// Python's str() of a value (None, True, 2.5, ['a', 1], {'k': 'v'}).
std::string PyStr(const Json& j);
// Python's repr() (strings quoted).
std::string PyRepr(const Json& j);
// Python's json.dumps(j, ensure_ascii=False, indent=indent) (indent < 0: none), appended.
void JsonDumps(const Json& j, int indent, int level, std::string* out);

// Numbers in Python's sense (bool counts as int).
bool IsNumber(const Json& j);
bool IsInt(const Json& j);
int64_t AsInt(const Json& j);
double AsDouble(const Json& j);
// Python's ==: 1 == 1.0 == True; lists element-wise.
bool Equal(const Json& a, const Json& b);

// str.isspace for one code point.
bool IsPySpace(uint32_t cp);
// str.strip / lstrip / rstrip: Python whitespace, or the code points of `chars` if have_chars.
std::string Strip(std::string_view s, bool left, bool right, std::string_view chars = {},
                  bool have_chars = false);
// The code points of `s` (valid UTF-8), one string each.
std::vector<std::string> CodePoints(std::string_view s);
// ASCII-only upper / lower case.
std::string AsciiCase(std::string s, bool upper);
// Every occurrence of `from` (non-empty) replaced by `to`.
std::string ReplaceAll(const std::string& s, const std::string& from, const std::string& to);

}  // namespace tokenlake::tokenizer::jinja

#endif  // TOKENLAKE_TOKENIZER_JINJA_VALUES_H_
