#include "tokenlake/tokenizer/jinja_values.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tokenlake/tokenizer/added_vocabulary.h"
#include "tokenlake/tokenizer/utf8.h"

namespace tokenlake::tokenizer::jinja {

// Python's repr of a float (shortest round-trip digits; exponent form outside 1e-4..1e16).
std::string PyFloat(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*e", precision - 1, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  // buf = "d.ddde[+-]XX": digits and exponent.
  std::string s(buf);
  const size_t e = s.find('e');
  std::string mantissa = s.substr(0, e);
  const int exponent = std::atoi(s.c_str() + e + 1);
  const bool negative = mantissa[0] == '-';
  if (negative) mantissa.erase(0, 1);
  std::string digits;
  for (char c : mantissa) {
    if (c != '.') digits += c;
  }
  std::string out;
  if (exponent >= 16 || exponent < -4) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) absl::StrAppend(&out, ".", digits.substr(1));
    char exp[16];
    std::snprintf(exp, sizeof(exp), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exp;
  } else if (exponent >= 0) {
    if (static_cast<int>(digits.size()) <= exponent + 1) {
      out = digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
    } else {
      out = absl::StrCat(digits.substr(0, exponent + 1), ".", digits.substr(exponent + 1));
    }
  } else {
    out = absl::StrCat("0.", std::string(-exponent - 1, '0'), digits);
  }
  return negative ? absl::StrCat("-", out) : out;
}

// Python's str() of a value.
std::string PyStr(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null:
      return "None";
    case Json::value_t::boolean:
      return j.get<bool>() ? "True" : "False";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return std::to_string(j.get<int64_t>());
    case Json::value_t::number_float:
      return PyFloat(j.get<double>());
    case Json::value_t::string:
      return j.get<std::string>();
    default:
      return PyRepr(j);
  }
}

std::string PyRepr(const Json& j) {
  if (j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    const char quote =
        s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
    std::string out(1, quote);
    for (char c : s) {
      if (c == quote || c == '\\') {
        out += '\\';
        out += c;
      } else if (c == '\n') {
        out += "\\n";
      } else if (c == '\r') {
        out += "\\r";
      } else if (c == '\t') {
        out += "\\t";
      } else if (static_cast<uint8_t>(c) < 0x20 || c == 0x7F) {
        char buf[8];
        std::snprintf(buf, sizeof(buf), "\\x%02x", static_cast<uint8_t>(c));
        out += buf;
      } else {
        out += c;
      }
    }
    return out + quote;
  }
  if (j.is_array()) {
    std::vector<std::string> items;
    for (const Json& x : j) items.push_back(PyRepr(x));
    return absl::StrCat("[", absl::StrJoin(items, ", "), "]");
  }
  if (j.is_object()) {
    std::vector<std::string> items;
    for (auto it = j.begin(); it != j.end(); ++it) {
      items.push_back(absl::StrCat(PyRepr(Json(it.key())), ": ", PyRepr(it.value())));
    }
    return absl::StrCat("{", absl::StrJoin(items, ", "), "}");
  }
  return PyStr(j);
}

// Python's json.dumps(j, ensure_ascii=False, indent=indent) (indent < 0: none).
void JsonDumps(const Json& j, int indent, int level, std::string* out) {
  const std::string nl =
      indent < 0 ? std::string() : absl::StrCat("\n", std::string(indent * (level + 1), ' '));
  const std::string nl_end =
      indent < 0 ? std::string() : absl::StrCat("\n", std::string(indent * level, ' '));
  const char* sep = indent < 0 ? ", " : ",";
  switch (j.type()) {
    case Json::value_t::null:
      *out += "null";
      return;
    case Json::value_t::boolean:
      *out += j.get<bool>() ? "true" : "false";
      return;
    case Json::value_t::number_float: {
      const double d = j.get<double>();
      *out += std::isnan(d)   ? "NaN"
              : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity")
                              : PyFloat(d);
      return;
    }
    case Json::value_t::string: {
      *out += '"';
      for (char c : j.get_ref<const std::string&>()) {
        switch (c) {
          case '"':
            *out += "\\\"";
            break;
          case '\\':
            *out += "\\\\";
            break;
          case '\n':
            *out += "\\n";
            break;
          case '\r':
            *out += "\\r";
            break;
          case '\t':
            *out += "\\t";
            break;
          case '\b':
            *out += "\\b";
            break;
          case '\f':
            *out += "\\f";
            break;
          default:
            if (static_cast<uint8_t>(c) < 0x20) {
              char buf[8];
              std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<uint8_t>(c));
              *out += buf;
            } else {
              *out += c;
            }
        }
      }
      *out += '"';
      return;
    }
    case Json::value_t::array: {
      if (j.empty()) {
        *out += "[]";
        return;
      }
      absl::StrAppend(out, "[", nl);
      bool first = true;
      for (const Json& x : j) {
        if (!first) absl::StrAppend(out, sep, nl);
        first = false;
        JsonDumps(x, indent, level + 1, out);
      }
      absl::StrAppend(out, nl_end, "]");
      return;
    }
    case Json::value_t::object: {
      if (j.empty()) {
        *out += "{}";
        return;
      }
      absl::StrAppend(out, "{", nl);
      bool first = true;
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (!first) absl::StrAppend(out, sep, nl);
        first = false;
        JsonDumps(Json(it.key()), indent, level + 1, out);
        *out += ": ";
        JsonDumps(it.value(), indent, level + 1, out);
      }
      absl::StrAppend(out, nl_end, "}");
      return;
    }
    default:
      *out += j.dump();
      return;
  }
}

bool IsNumber(const Json& j) { return j.is_number() || j.is_boolean(); }
bool IsInt(const Json& j) { return j.is_number_integer() || j.is_boolean(); }
int64_t AsInt(const Json& j) { return j.is_boolean() ? (j.get<bool>() ? 1 : 0) : j.get<int64_t>(); }
double AsDouble(const Json& j) {
  return j.is_boolean() ? (j.get<bool>() ? 1.0 : 0.0) : j.get<double>();
}

bool Equal(const Json& a, const Json& b) {
  if (IsNumber(a) && IsNumber(b)) {
    if (IsInt(a) && IsInt(b)) return AsInt(a) == AsInt(b);
    return AsDouble(a) == AsDouble(b);
  }
  if (a.is_array() && b.is_array()) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!Equal(a[i], b[i])) return false;
    }
    return true;
  }
  return a == b;
}

// Python's str.strip() whitespace (str.isspace): Unicode White_Space plus \x1c-\x1f.
bool IsPySpace(uint32_t cp) { return IsUnicodeWhitespace(cp) || (cp >= 0x1C && cp <= 0x1F); }

std::string Strip(std::string_view s, bool left, bool right, std::string_view chars,
                  bool have_chars) {
  auto is_strip = [&](uint32_t cp) {
    if (!have_chars) return IsPySpace(cp);
    size_t p = 0;
    while (p < chars.size()) {
      uint32_t c = 0;
      DecodeCodePoint(chars, &p, &c);
      if (c == cp) return true;
    }
    return false;
  };
  size_t begin = 0;
  size_t end = s.size();
  if (left) {
    while (begin < end) {
      size_t p = begin;
      uint32_t cp = 0;
      DecodeCodePoint(s, &p, &cp);
      if (!is_strip(cp)) break;
      begin = p;
    }
  }
  if (right) {
    while (end > begin) {
      size_t start = end - 1;
      while (start > begin && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) --start;
      size_t p = start;
      uint32_t cp = 0;
      DecodeCodePoint(s, &p, &cp);
      if (!is_strip(cp)) break;
      end = start;
    }
  }
  return std::string(s.substr(begin, end - begin));
}

std::vector<std::string> CodePoints(std::string_view s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t start = pos;
    uint32_t cp = 0;
    DecodeCodePoint(s, &pos, &cp);
    out.emplace_back(s.substr(start, pos - start));
  }
  return out;
}

std::string AsciiCase(std::string s, bool upper) {
  for (char& c : s) {
    if (upper && c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
    if (!upper && c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

std::string ReplaceAll(const std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  std::string out;
  size_t pos = 0;
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, pos)) {
    out.append(s, pos, at - pos);
    out += to;
    pos = at + from.size();
  }
  out.append(s, pos);
  return out;
}

}  // namespace tokenlake::tokenizer::jinja
