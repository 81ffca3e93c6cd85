// Evaluator of the Jinja subset (jinja.h); the parser is jinja_parse.cc.
#include <cmath>
#include <cstdio>
#include <ctime>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/tokenizer/added_vocabulary.h"
#include "tokenlake/tokenizer/jinja.h"
#include "tokenlake/tokenizer/jinja_values.h"
#include "tokenlake/tokenizer/utf8.h"

namespace tokenlake::tokenizer::jinja {
namespace {

// A value: JSON, Jinja's undefined, or a namespace() object (mutable through `set ns.x`).
struct Value {
  Json j;
  bool undefined = false;
  std::shared_ptr<Json> ns;

  static Value Undefined() {
    Value v;
    v.undefined = true;
    return v;
  }
  static Value Of(Json j) {
    Value v;
    v.j = std::move(j);
    return v;
  }
  const Json& json() const { return ns != nullptr ? *ns : j; }
};

bool Truthy(const Value& v) {
  if (v.undefined) return false;
  if (v.ns != nullptr) return true;
  const Json& j = v.j;
  switch (j.type()) {
    case Json::value_t::null:
      return false;
    case Json::value_t::boolean:
      return j.get<bool>();
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return j.get<int64_t>() != 0;
    case Json::value_t::number_float:
      return j.get<double>() != 0.0;
    case Json::value_t::string:
      return !j.get_ref<const std::string&>().empty();
    case Json::value_t::array:
    case Json::value_t::object:
      return !j.empty();
    default:
      return false;
  }
}

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  Renderer(const std::string& name, const Json& context, const RenderLimits& limits)
      : name_(name), kMaxSteps(limits.max_steps), kMaxOutputBytes(limits.max_bytes) {
    scopes_.emplace_back();
    for (auto it = context.begin(); it != context.end(); ++it) {
      scopes_.back()[it.key()] = Value::Of(it.value());
    }
  }

  absl::Status Exec(const NodeList& nodes, std::string* out, Flow* flow) {
    for (const auto& n : nodes) {
      TOKENLAKE_RETURN_IF_ERROR(ExecOne(*n, out, flow));
      if (*flow != Flow::kNormal) return absl::OkStatus();
    }
    return absl::OkStatus();
  }

 private:
  absl::Status ErrorAt(Pos p, const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": line ", p.line, ", column ", p.column, ": ", what));
  }

  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value::Undefined();
  }

  absl::Status ExecOne(const Node& n, std::string* out, Flow* flow) {
    if (++steps_ > kMaxSteps) {
      return ErrorAt(n.pos, absl::StrCat("the template ran more than ", kMaxSteps, " steps"));
    }
    if (out->size() > kMaxOutputBytes) {
      return ErrorAt(n.pos, absl::StrCat("the output is longer than ", kMaxOutputBytes, " bytes"));
    }
    switch (n.kind) {
      case Node::Kind::kText:
        *out += n.text;
        return absl::OkStatus();
      case Node::Kind::kOutput: {
        TOKENLAKE_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        if (!v.undefined) *out += v.ns != nullptr ? "<Namespace>" : PyStr(v.j);
        return absl::OkStatus();
      }
      case Node::Kind::kIf: {
        TOKENLAKE_ASSIGN_OR_RETURN(Value c, Eval(*n.expr));
        return Exec(Truthy(c) ? n.body : n.else_body, out, flow);
      }
      case Node::Kind::kSet: {
        TOKENLAKE_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        if (n.attr.empty()) {
          scopes_.back()[n.targets[0]] = std::move(v);
          return absl::OkStatus();
        }
        Value target = Lookup(n.targets[0]);
        if (target.ns == nullptr) {
          return ErrorAt(n.pos, absl::StrCat("'", n.targets[0], "' is not a namespace: cannot set ",
                                             n.targets[0], ".", n.attr));
        }
        if (v.undefined) {
          target.ns->erase(n.attr);
        } else {
          (*target.ns)[n.attr] = v.json();
        }
        return absl::OkStatus();
      }
      case Node::Kind::kBreak:
        *flow = Flow::kBreak;
        return absl::OkStatus();
      case Node::Kind::kContinue:
        *flow = Flow::kContinue;
        return absl::OkStatus();
      case Node::Kind::kBlock:
        return Exec(n.body, out, flow);
      case Node::Kind::kFor:
        return ExecFor(n, out, flow);
    }
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Node& n, std::string* out, Flow* flow) {
    TOKENLAKE_ASSIGN_OR_RETURN(Value seq, Eval(*n.expr));
    std::vector<Json> items;
    if (!seq.undefined) {
      const Json& j = seq.json();
      if (j.is_array()) {
        items.assign(j.begin(), j.end());
      } else if (j.is_object()) {
        for (auto it = j.begin(); it != j.end(); ++it) items.emplace_back(it.key());
      } else if (j.is_string()) {
        for (std::string& c : CodePoints(j.get<std::string>())) items.emplace_back(std::move(c));
      } else {
        return ErrorAt(n.expr->pos, absl::StrCat("cannot iterate over ", PyRepr(j)));
      }
    }
    auto bind = [&](const Json& item) -> absl::Status {
      if (n.targets.size() == 1) {
        scopes_.back()[n.targets[0]] = Value::Of(item);
        return absl::OkStatus();
      }
      if (!item.is_array() || item.size() != n.targets.size()) {
        return ErrorAt(n.pos, absl::StrCat("cannot unpack ", PyRepr(item), " into ",
                                           n.targets.size(), " loop variables"));
      }
      for (size_t i = 0; i < n.targets.size(); ++i)
        scopes_.back()[n.targets[i]] = Value::Of(item[i]);
      return absl::OkStatus();
    };
    if (n.cond != nullptr) {
      std::vector<Json> kept;
      for (const Json& item : items) {
        scopes_.emplace_back();
        absl::Status s = bind(item);
        absl::StatusOr<Value> c = s.ok() ? Eval(*n.cond) : absl::StatusOr<Value>(s);
        scopes_.pop_back();
        if (!c.ok()) return c.status();
        if (Truthy(*c)) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      if (++steps_ > kMaxSteps) {
        return ErrorAt(n.pos, absl::StrCat("the template ran more than ", kMaxSteps, " steps"));
      }
      scopes_.emplace_back();
      Json loop = Json::object();
      loop["index"] = i + 1;
      loop["index0"] = i;
      loop["revindex"] = length - i;
      loop["revindex0"] = length - i - 1;
      loop["first"] = i == 0;
      loop["last"] = i == length - 1;
      loop["length"] = length;
      if (i > 0) loop["previtem"] = items[i - 1];
      if (i + 1 < length) loop["nextitem"] = items[i + 1];
      scopes_.back()["loop"] = Value::Of(std::move(loop));
      absl::Status s = bind(items[i]);
      Flow body_flow = Flow::kNormal;
      if (s.ok()) s = Exec(n.body, out, &body_flow);
      scopes_.pop_back();
      TOKENLAKE_RETURN_IF_ERROR(s);
      if (body_flow == Flow::kBreak) break;
    }
    if (length == 0) return Exec(n.else_body, out, flow);
    return absl::OkStatus();
  }

  absl::StatusOr<Value> Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return Value::Of(e.value);
      case Expr::Kind::kName:
        return Lookup(e.name);
      case Expr::Kind::kList: {
        Json list = Json::array();
        for (const auto& item : e.items) {
          TOKENLAKE_ASSIGN_OR_RETURN(Value v, Eval(*item));
          list.push_back(v.undefined ? Json() : v.json());
        }
        return Value::Of(std::move(list));
      }
      case Expr::Kind::kDict: {
        Json dict = Json::object();
        for (size_t i = 0; i + 1 < e.items.size(); i += 2) {
          TOKENLAKE_ASSIGN_OR_RETURN(Value k, Eval(*e.items[i]));
          TOKENLAKE_ASSIGN_OR_RETURN(Value v, Eval(*e.items[i + 1]));
          if (!k.j.is_string()) return ErrorAt(e.items[i]->pos, "dict keys must be strings");
          dict[k.j.get<std::string>()] = v.undefined ? Json() : v.json();
        }
        return Value::Of(std::move(dict));
      }
      case Expr::Kind::kAttr: {
        TOKENLAKE_ASSIGN_OR_RETURN(Value obj, Eval(*e.items[0]));
        return GetItem(obj, Json(e.name), e.pos, /*attribute=*/true);
      }
      case Expr::Kind::kIndex: {
        TOKENLAKE_ASSIGN_OR_RETURN(Value obj, Eval(*e.items[0]));
        TOKENLAKE_ASSIGN_OR_RETURN(Value key, Eval(*e.items[1]));
        return GetItem(obj, key.j, e.pos, /*attribute=*/false);
      }
      case Expr::Kind::kSlice:
        return EvalSlice(e);
      case Expr::Kind::kCall:
        return EvalCall(e);
      case Expr::Kind::kFilter:
        return EvalFilter(e);
      case Expr::Kind::kTest:
        return EvalTest(e);
      case Expr::Kind::kUnary: {
        TOKENLAKE_ASSIGN_OR_RETURN(Value x, Eval(*e.items[0]));
        if (e.name == "not") return Value::Of(!Truthy(x));
        if (x.undefined || !IsNumber(x.j)) {
          return ErrorAt(e.pos, absl::StrCat("bad operand for unary ", e.name));
        }
        if (e.name == "+") return x;
        return Value::Of(IsInt(x.j) ? Json(-AsInt(x.j)) : Json(-AsDouble(x.j)));
      }
      case Expr::Kind::kBinary:
        return EvalBinary(e);
      case Expr::Kind::kCond: {
        TOKENLAKE_ASSIGN_OR_RETURN(Value c, Eval(*e.items[0]));
        if (Truthy(c)) return Eval(*e.items[1]);
        if (e.items[2] == nullptr) return Value::Undefined();
        return Eval(*e.items[2]);
      }
    }
    return ErrorAt(e.pos, "unknown expression");
  }

  absl::StatusOr<Value> GetItem(const Value& obj, const Json& key, Pos pos, bool attribute) {
    if (obj.undefined) {
      return ErrorAt(pos, absl::StrCat(attribute ? "attribute " : "item ", PyRepr(key),
                                       " of an undefined value"));
    }
    const Json& j = obj.json();
    if (j.is_object()) {
      if (!key.is_string()) return Value::Undefined();
      auto it = j.find(key.get<std::string>());
      if (it == j.end()) return Value::Undefined();
      return Value::Of(*it);
    }
    if ((j.is_array() || j.is_string()) && IsInt(key) && !key.is_boolean()) {
      std::vector<std::string> chars;
      if (j.is_string()) chars = CodePoints(j.get<std::string>());
      const int64_t n =
          j.is_array() ? static_cast<int64_t>(j.size()) : static_cast<int64_t>(chars.size());
      int64_t i = AsInt(key);
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::Undefined();
      return Value::Of(j.is_array() ? j[i] : Json(chars[i]));
    }
    if (j.is_null()) {
      return ErrorAt(pos,
                     absl::StrCat(attribute ? "attribute " : "item ", PyRepr(key), " of None"));
    }
    return Value::Undefined();
  }

  absl::StatusOr<Value> EvalSlice(const Expr& e) {
    TOKENLAKE_ASSIGN_OR_RETURN(Value obj, Eval(*e.items[0]));
    if (obj.undefined || !(obj.j.is_array() || obj.j.is_string())) {
      return ErrorAt(e.pos, "only lists and strings can be sliced");
    }
    std::optional<int64_t> bounds[3];
    for (int k = 0; k < 3; ++k) {
      if (static_cast<size_t>(k + 1) >= e.items.size() || e.items[k + 1] == nullptr) continue;
      TOKENLAKE_ASSIGN_OR_RETURN(Value b, Eval(*e.items[k + 1]));
      if (b.j.is_null() || b.undefined) continue;
      if (!IsInt(b.j)) return ErrorAt(e.pos, "slice indices must be integers");
      bounds[k] = AsInt(b.j);
    }
    std::vector<Json> seq;
    if (obj.j.is_array()) {
      seq.assign(obj.j.begin(), obj.j.end());
    } else {
      for (std::string& c : CodePoints(obj.j.get<std::string>())) seq.emplace_back(std::move(c));
    }
    const int64_t n = static_cast<int64_t>(seq.size());
    const int64_t step = bounds[2].value_or(1);
    if (step == 0) return ErrorAt(e.pos, "slice step cannot be zero");
    auto clamp = [&](std::optional<int64_t> v, int64_t def) {
      if (!v) return def;
      int64_t x = *v < 0 ? *v + n : *v;
      if (step > 0) return std::clamp<int64_t>(x, 0, n);
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    const int64_t start = clamp(bounds[0], step > 0 ? 0 : n - 1);
    const int64_t stop = clamp(bounds[1], step > 0 ? n : -1);
    Json out = obj.j.is_array() ? Json::array() : Json(std::string());
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (out.is_array()) {
        out.push_back(seq[i]);
      } else {
        out.get_ref<std::string&>() += seq[i].get<std::string>();
      }
    }
    return Value::Of(std::move(out));
  }

  absl::StatusOr<Value> EvalBinary(const Expr& e) {
    const std::string& op = e.name;
    TOKENLAKE_ASSIGN_OR_RETURN(Value a, Eval(*e.items[0]));
    if (op == "and") return Truthy(a) ? Eval(*e.items[1]) : a;
    if (op == "or") return Truthy(a) ? a : Eval(*e.items[1]);
    TOKENLAKE_ASSIGN_OR_RETURN(Value b, Eval(*e.items[1]));
    const Json& x = a.json();
    const Json& y = b.json();
    if (op == "~" ||
        (op == "+" && ((x.is_string() && y.is_string()) || (x.is_array() && y.is_array())))) {
      const size_t size = (x.is_string() ? x.get_ref<const std::string&>().size() : x.size()) +
                          (y.is_string() ? y.get_ref<const std::string&>().size() : y.size());
      if (size > kMaxOutputBytes) {
        return ErrorAt(e.pos, absl::StrCat("a value longer than ", kMaxOutputBytes, " bytes"));
      }
    }
    if (op == "~") {
      return Value::Of(absl::StrCat(a.undefined ? "" : PyStr(x), b.undefined ? "" : PyStr(y)));
    }
    if (op == "==" || op == "!=") {
      const bool eq = (a.undefined || b.undefined) ? (a.undefined && b.undefined) : Equal(x, y);
      return Value::Of(op == "==" ? eq : !eq);
    }
    if (op == "in" || op == "not in") {
      if (b.undefined) return ErrorAt(e.pos, "'in' an undefined value");
      bool found = false;
      if (y.is_string()) {
        if (!x.is_string()) return ErrorAt(e.pos, "'in <string>' needs a string on the left");
        found = y.get_ref<const std::string&>().find(x.get<std::string>()) != std::string::npos;
      } else if (y.is_array()) {
        for (const Json& item : y) found = found || (!a.undefined && Equal(item, x));
      } else if (y.is_object()) {
        found = x.is_string() && y.contains(x.get<std::string>());
      } else {
        return ErrorAt(e.pos, absl::StrCat("'in' needs a string, list or dict, not ", PyRepr(y)));
      }
      return Value::Of(op == "in" ? found : !found);
    }
    if (a.undefined || b.undefined) {
      return ErrorAt(e.pos, absl::StrCat("operator '", op, "' on an undefined value"));
    }
    if (op == "<" || op == "<=" || op == ">" || op == ">=") {
      int cmp = 0;
      if (IsNumber(x) && IsNumber(y)) {
        const double dx = AsDouble(x), dy = AsDouble(y);
        cmp = IsInt(x) && IsInt(y) ? (AsInt(x) < AsInt(y)   ? -1
                                      : AsInt(x) > AsInt(y) ? 1
                                                            : 0)
                                   : (dx < dy   ? -1
                                      : dx > dy ? 1
                                                : 0);
      } else if (x.is_string() && y.is_string()) {
        cmp = x.get_ref<const std::string&>().compare(y.get_ref<const std::string&>());
      } else {
        return ErrorAt(e.pos, absl::StrCat("cannot compare ", PyRepr(x), " and ", PyRepr(y)));
      }
      const bool r = op == "<" ? cmp < 0 : op == "<=" ? cmp <= 0 : op == ">" ? cmp > 0 : cmp >= 0;
      return Value::Of(r);
    }
    if (op == "+") {
      if (x.is_string() && y.is_string())
        return Value::Of(x.get<std::string>() + y.get<std::string>());
      if (x.is_array() && y.is_array()) {
        Json out = x;
        for (const Json& item : y) out.push_back(item);
        return Value::Of(std::move(out));
      }
    }
    if (op == "*" && ((x.is_string() && IsInt(y)) || (IsInt(x) && y.is_string()))) {
      const std::string& s =
          x.is_string() ? x.get_ref<const std::string&>() : y.get_ref<const std::string&>();
      std::string out;
      const int64_t times = AsInt(x.is_string() ? y : x);
      if (times > 0 && static_cast<double>(s.size()) * times > kMaxOutputBytes) {
        return ErrorAt(e.pos, "string repetition longer than the output limit");
      }
      for (int64_t i = times; i > 0; --i) out += s;
      return Value::Of(std::move(out));
    }
    if (!IsNumber(x) || !IsNumber(y)) {
      return ErrorAt(e.pos, absl::StrCat("unsupported operand types for ", op, ": ", PyRepr(x),
                                         " and ", PyRepr(y)));
    }
    const bool ints = IsInt(x) && IsInt(y);
    if (op == "+")
      return Value::Of(ints ? Json(AsInt(x) + AsInt(y)) : Json(AsDouble(x) + AsDouble(y)));
    if (op == "-")
      return Value::Of(ints ? Json(AsInt(x) - AsInt(y)) : Json(AsDouble(x) - AsDouble(y)));
    if (op == "*")
      return Value::Of(ints ? Json(AsInt(x) * AsInt(y)) : Json(AsDouble(x) * AsDouble(y)));
    if (op == "**") {
      if (ints && AsInt(y) >= 0) {
        int64_t r = 1;
        for (int64_t i = 0; i < AsInt(y); ++i) r *= AsInt(x);
        return Value::Of(r);
      }
      return Value::Of(std::pow(AsDouble(x), AsDouble(y)));
    }
    if (AsDouble(y) == 0.0) return ErrorAt(e.pos, "division by zero");
    if (op == "/") return Value::Of(AsDouble(x) / AsDouble(y));
    if (ints) {
      const int64_t p = AsInt(x), q = AsInt(y);
      int64_t div = p / q;
      if ((p % q != 0) && ((p < 0) != (q < 0))) --div;
      if (op == "//") return Value::Of(div);
      return Value::Of(p - div * q);  // %, Python's sign rule
    }
    const double fd = std::floor(AsDouble(x) / AsDouble(y));
    if (op == "//") return Value::Of(fd);
    return Value::Of(AsDouble(x) - fd * AsDouble(y));
  }

  // Evaluated arguments of a call, filter or test (items from `first`).
  struct Args {
    std::vector<Value> positional;
    absl::flat_hash_map<std::string, Value> named;
    const Value* Get(size_t i, const std::string& name) const {
      auto it = named.find(name);
      if (it != named.end()) return &it->second;
      return i < positional.size() ? &positional[i] : nullptr;
    }
  };
  absl::StatusOr<Args> EvalArgs(const Expr& e, size_t first) {
    Args args;
    const size_t num_named = e.kwarg_names.size();
    const size_t num_positional = e.items.size() - first - num_named;
    for (size_t i = first; i < e.items.size(); ++i) {
      TOKENLAKE_ASSIGN_OR_RETURN(Value v, Eval(*e.items[i]));
      const size_t k = i - first;
      if (k < num_positional) {
        args.positional.push_back(std::move(v));
      } else {
        args.named[e.kwarg_names[k - num_positional]] = std::move(v);
      }
    }
    return args;
  }

  absl::StatusOr<Value> EvalCall(const Expr& e);
  absl::StatusOr<Value> EvalFilter(const Expr& e);
  absl::StatusOr<Value> EvalTest(const Expr& e);

  const std::string& name_;
  std::vector<absl::flat_hash_map<std::string, Value>> scopes_;
  int64_t steps_ = 0;
  // The bounds of this rendering (named as constants: they do not change during it).
  const int64_t kMaxSteps;
  const size_t kMaxOutputBytes;
};

// --- built-in functions, methods, filters and tests -------------------------------------

constexpr std::string_view kFilters[] = {
    "trim",       "length", "count",   "tojson", "upper",  "lower",      "first",
    "last",       "join",   "default", "d",      "string", "list",       "replace",
    "capitalize", "abs",    "int",     "items",  "map",    "selectattr", "rejectattr"};
constexpr std::string_view kTests[] = {"defined",  "undefined", "none",    "string",  "number",
                                       "integer",  "float",     "boolean", "mapping", "iterable",
                                       "sequence", "odd",       "even",    "true",    "false",
                                       "eq",       "equalto",   "ne",      "sameas"};
constexpr std::string_view kFunctions[] = {"raise_exception", "range", "namespace", "strftime_now"};
constexpr std::string_view kMethods[] = {"strip",      "lstrip",   "rstrip", "upper",   "lower",
                                         "startswith", "endswith", "split",  "replace", "items",
                                         "keys",       "values",   "get"};

template <size_t N>
bool Contains(const std::string_view (&names)[N], std::string_view name) {
  for (std::string_view n : names) {
    if (n == name) return true;
  }
  return false;
}

absl::StatusOr<bool> ApplyTest(const std::string& test, const Value& v, const Value* arg) {
  const Json& j = v.json();
  if (test == "defined") return !v.undefined;
  if (test == "undefined") return v.undefined;
  if (v.undefined) return false;
  if (test == "none") return j.is_null();
  if (test == "string") return j.is_string();
  if (test == "number") return j.is_number();
  if (test == "integer") return j.is_number_integer();
  if (test == "float") return j.is_number_float();
  if (test == "boolean") return j.is_boolean();
  if (test == "true") return j.is_boolean() && j.get<bool>();
  if (test == "false") return j.is_boolean() && !j.get<bool>();
  if (test == "mapping") return j.is_object() || v.ns != nullptr;
  if (test == "iterable") return j.is_array() || j.is_object() || j.is_string();
  if (test == "sequence") return j.is_array() || j.is_object() || j.is_string();
  if (test == "odd" || test == "even") {
    if (!IsInt(j))
      return absl::InvalidArgumentError(absl::StrCat("test '", test, "' needs an integer"));
    return (((AsInt(j) % 2) + 2) % 2 == 1) == (test == "odd");
  }
  if (arg == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("test '", test, "' needs an argument"));
  const bool eq = !arg->undefined && Equal(j, arg->json());
  if (test == "ne") return !eq;
  return eq;  // eq, equalto, sameas
}

absl::StatusOr<Value> Renderer::EvalCall(const Expr& e) {
  const Expr& callee = *e.items[0];
  TOKENLAKE_ASSIGN_OR_RETURN(Args args, EvalArgs(e, 1));
  auto arg = [&](size_t i, const std::string& name) { return args.Get(i, name); };
  if (callee.kind == Expr::Kind::kName) {
    const std::string& f = callee.name;
    if (f == "raise_exception") {
      const Value* m = arg(0, "message");
      return absl::InvalidArgumentError(m == nullptr || m->undefined ? "raise_exception"
                                                                     : PyStr(m->json()));
    }
    if (f == "namespace") {
      Value v;
      v.ns = std::make_shared<Json>(Json::object());
      for (const auto& [k, x] : args.named) (*v.ns)[k] = x.json();
      return v;
    }
    if (f == "range") {
      int64_t b[3] = {0, 0, 1};
      const size_t n = args.positional.size();
      if (n < 1 || n > 3) return ErrorAt(e.pos, "range() takes 1 to 3 integers");
      for (size_t i = 0; i < n; ++i) {
        if (!IsInt(args.positional[i].json())) return ErrorAt(e.pos, "range() takes integers");
      }
      if (n == 1) {
        b[1] = AsInt(args.positional[0].json());
      } else {
        for (size_t i = 0; i < n; ++i) b[i] = AsInt(args.positional[i].json());
      }
      if (b[2] == 0) return ErrorAt(e.pos, "range() step cannot be zero");
      Json out = Json::array();
      for (int64_t i = b[0]; b[2] > 0 ? i < b[1] : i > b[1]; i += b[2]) {
        if (out.size() >= 100000) return ErrorAt(e.pos, "range() longer than 100000");
        out.push_back(i);
      }
      return Value::Of(std::move(out));
    }
    if (f == "strftime_now") {
      const Value* fmt = arg(0, "format");
      if (fmt == nullptr || !fmt->json().is_string())
        return ErrorAt(e.pos, "strftime_now() takes a format string");
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const size_t len =
          std::strftime(buf, sizeof(buf), fmt->json().get<std::string>().c_str(), &tm);
      return Value::Of(std::string(buf, len));
    }
    const Value v = Lookup(f);
    return ErrorAt(e.pos, v.undefined ? absl::StrCat("unknown function '", f, "'")
                                      : absl::StrCat("'", f, "' is not callable"));
  }
  if (callee.kind != Expr::Kind::kAttr) return ErrorAt(e.pos, "this expression is not callable");
  TOKENLAKE_ASSIGN_OR_RETURN(Value obj, Eval(*callee.items[0]));
  const std::string& m = callee.name;
  const Json& j = obj.json();
  auto str_arg = [&](size_t i, const char* name) -> const Json* {
    const Value* v = arg(i, name);
    return v != nullptr && v->json().is_string() ? &v->json() : nullptr;
  };
  if (!obj.undefined && j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    if (m == "strip" || m == "lstrip" || m == "rstrip") {
      const Json* chars = str_arg(0, "chars");
      return Value::Of(Strip(s, m != "rstrip", m != "lstrip",
                             chars ? chars->get_ref<const std::string&>() : "", chars != nullptr));
    }
    if (m == "upper" || m == "lower") return Value::Of(AsciiCase(s, m == "upper"));
    if (m == "startswith" || m == "endswith") {
      const Json* x = str_arg(0, "prefix");
      if (x == nullptr) return ErrorAt(e.pos, absl::StrCat(m, "() takes a string"));
      const std::string& t = x->get_ref<const std::string&>();
      const bool r = m == "startswith"
                         ? s.rfind(t, 0) == 0
                         : s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
      return Value::Of(r);
    }
    if (m == "split") {
      const Json* sep = str_arg(0, "sep");
      Json out = Json::array();
      if (sep == nullptr) {
        std::string word;
        for (const std::string& c : CodePoints(s)) {
          size_t p = 0;
          uint32_t cp = 0;
          DecodeCodePoint(c, &p, &cp);
          if (IsPySpace(cp)) {
            if (!word.empty()) out.push_back(word);
            word.clear();
          } else {
            word += c;
          }
        }
        if (!word.empty()) out.push_back(word);
      } else {
        if (sep->get_ref<const std::string&>().empty())
          return ErrorAt(e.pos, "split() separator is empty");
        for (absl::string_view part : absl::StrSplit(s, sep->get_ref<const std::string&>())) {
          out.push_back(std::string(part));
        }
      }
      return Value::Of(std::move(out));
    }
    if (m == "replace") {
      const Json* a = str_arg(0, "old");
      const Json* b = str_arg(1, "new");
      if (a == nullptr || b == nullptr) return ErrorAt(e.pos, "replace() takes two strings");
      return Value::Of(ReplaceAll(s, a->get<std::string>(), b->get<std::string>()));
    }
  }
  if (!obj.undefined && j.is_object()) {
    if (m == "items" || m == "keys" || m == "values") {
      Json out = Json::array();
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (m == "items") out.push_back(Json::array({it.key(), it.value()}));
        if (m == "keys") out.push_back(it.key());
        if (m == "values") out.push_back(it.value());
      }
      return Value::Of(std::move(out));
    }
    if (m == "get") {
      const Json* k = str_arg(0, "key");
      if (k != nullptr && j.contains(k->get<std::string>()))
        return Value::Of(j[k->get<std::string>()]);
      const Value* d = arg(1, "default");
      return d != nullptr ? *d : Value::Of(nullptr);
    }
  }
  return ErrorAt(e.pos, absl::StrCat("no method '", m, "' on ",
                                     obj.undefined ? "an undefined value" : PyRepr(j)));
}

absl::StatusOr<Value> Renderer::EvalFilter(const Expr& e) {
  TOKENLAKE_ASSIGN_OR_RETURN(Value x, Eval(*e.items[0]));
  TOKENLAKE_ASSIGN_OR_RETURN(Args args, EvalArgs(e, 1));
  const std::string& f = e.name;
  if (f == "default" || f == "d") {
    const Value* d = args.Get(0, "default_value");
    const Value* boolean = args.Get(1, "boolean");
    const bool use_default = x.undefined || (boolean != nullptr && Truthy(*boolean) && !Truthy(x));
    if (!use_default) return x;
    return d != nullptr ? *d : Value::Of("");
  }
  if (x.undefined) {
    if (f == "length" || f == "count") return Value::Of(0);
    if (f == "trim" || f == "upper" || f == "lower" || f == "string" || f == "capitalize")
      return Value::Of("");
    return ErrorAt(e.pos, absl::StrCat("filter '", f, "' on an undefined value"));
  }
  const Json& j = x.json();
  const bool is_str = j.is_string();
  const std::string s = is_str ? j.get<std::string>() : PyStr(j);
  if (f == "trim") {
    const Value* chars = args.Get(0, "chars");
    const bool have = chars != nullptr && chars->json().is_string();
    return Value::Of(
        Strip(s, true, true, have ? chars->json().get_ref<const std::string&>() : "", have));
  }
  if (f == "upper" || f == "lower") return Value::Of(AsciiCase(s, f == "upper"));
  if (f == "capitalize") {
    std::string out = AsciiCase(s, false);
    if (!out.empty()) out[0] = AsciiCase(out.substr(0, 1), true)[0];
    return Value::Of(out);
  }
  if (f == "string") return Value::Of(s);
  if (f == "length" || f == "count") {
    if (is_str) return Value::Of(static_cast<int64_t>(CodePoints(s).size()));
    if (j.is_array() || j.is_object()) return Value::Of(static_cast<int64_t>(j.size()));
    return ErrorAt(e.pos, absl::StrCat("filter '", f, "' on ", PyRepr(j)));
  }
  if (f == "tojson") {
    const Value* indent = args.Get(0, "indent");
    std::string out;
    JsonDumps(
        j,
        indent != nullptr && IsInt(indent->json()) ? static_cast<int>(AsInt(indent->json())) : -1,
        0, &out);
    return Value::Of(out);
  }
  if (f == "first" || f == "last") {
    if (is_str) {
      const auto chars = CodePoints(s);
      if (chars.empty()) return Value::Undefined();
      return Value::Of(f == "first" ? chars.front() : chars.back());
    }
    if (!j.is_array()) return ErrorAt(e.pos, absl::StrCat("filter '", f, "' on ", PyRepr(j)));
    if (j.empty()) return Value::Undefined();
    return Value::Of(f == "first" ? j.front() : j.back());
  }
  if (f == "join") {
    const Value* sep = args.Get(0, "d");
    const Value* attribute = args.Get(1, "attribute");
    if (!j.is_array()) return ErrorAt(e.pos, "filter 'join' needs a list");
    std::string out;
    bool first = true;
    for (const Json& item : j) {
      if (!first && sep != nullptr) out += PyStr(sep->json());
      first = false;
      const Json* v = &item;
      if (attribute != nullptr && item.is_object() && attribute->json().is_string() &&
          item.contains(attribute->json().get<std::string>())) {
        v = &item[attribute->json().get<std::string>()];
      }
      out += PyStr(*v);
    }
    return Value::Of(out);
  }
  if (f == "list") {
    if (j.is_array()) return x;
    Json out = Json::array();
    if (is_str) {
      for (std::string& c : CodePoints(s)) out.push_back(std::move(c));
    } else if (j.is_object()) {
      for (auto it = j.begin(); it != j.end(); ++it) out.push_back(it.key());
    } else {
      return ErrorAt(e.pos, absl::StrCat("filter 'list' on ", PyRepr(j)));
    }
    return Value::Of(std::move(out));
  }
  if (f == "replace") {
    const Value* a = args.Get(0, "old");
    const Value* b = args.Get(1, "new");
    if (a == nullptr || b == nullptr) return ErrorAt(e.pos, "filter 'replace' takes two strings");
    return Value::Of(ReplaceAll(s, PyStr(a->json()), PyStr(b->json())));
  }
  if (f == "abs") {
    if (!IsNumber(j)) return ErrorAt(e.pos, "filter 'abs' needs a number");
    return Value::Of(IsInt(j) ? Json(std::llabs(AsInt(j))) : Json(std::fabs(AsDouble(j))));
  }
  if (f == "int") {
    if (IsNumber(j)) return Value::Of(IsInt(j) ? AsInt(j) : static_cast<int64_t>(AsDouble(j)));
    char* end = nullptr;
    const std::string t = Strip(s, true, true);
    const long long v = std::strtoll(t.c_str(), &end, 10);
    if (t.empty() || *end != '\0') {
      const Value* d = args.Get(0, "default");
      return d != nullptr ? *d : Value::Of(0);
    }
    return Value::Of(static_cast<int64_t>(v));
  }
  if (f == "items") {
    if (!j.is_object()) return ErrorAt(e.pos, "filter 'items' needs a dict");
    Json out = Json::array();
    for (auto it = j.begin(); it != j.end(); ++it)
      out.push_back(Json::array({it.key(), it.value()}));
    return Value::Of(std::move(out));
  }
  if (f == "map" || f == "selectattr" || f == "rejectattr") {
    if (!j.is_array()) return ErrorAt(e.pos, absl::StrCat("filter '", f, "' needs a list"));
    const Value* attribute = f == "map" ? args.Get(99, "attribute") : args.Get(0, "attribute");
    if (attribute == nullptr || !attribute->json().is_string()) {
      return ErrorAt(e.pos, absl::StrCat("filter '", f, "' supports only an attribute name"));
    }
    const Json key = attribute->json();
    Json out = Json::array();
    for (const Json& item : j) {
      TOKENLAKE_ASSIGN_OR_RETURN(Value v, GetItem(Value::Of(item), key, e.pos, true));
      if (f == "map") {
        if (v.undefined) {
          const Value* d = args.Get(99, "default");
          out.push_back(d != nullptr ? d->json() : Json());
        } else {
          out.push_back(v.json());
        }
        continue;
      }
      bool keep = Truthy(v);
      if (args.positional.size() >= 2) {
        const Value& test = args.positional[1];
        if (!test.json().is_string() || !Contains(kTests, test.json().get<std::string>())) {
          return ErrorAt(e.pos, absl::StrCat("unsupported test in filter '", f, "'"));
        }
        auto r = ApplyTest(test.json().get<std::string>(), v,
                           args.positional.size() >= 3 ? &args.positional[2] : nullptr);
        if (!r.ok()) return ErrorAt(e.pos, std::string(r.status().message()));
        keep = *r;
      }
      if (keep == (f == "selectattr")) out.push_back(item);
    }
    return Value::Of(std::move(out));
  }
  return ErrorAt(e.pos, absl::StrCat("unsupported filter '", f, "'"));
}

absl::StatusOr<Value> Renderer::EvalTest(const Expr& e) {
  TOKENLAKE_ASSIGN_OR_RETURN(Value x, Eval(*e.items[0]));
  TOKENLAKE_ASSIGN_OR_RETURN(Args args, EvalArgs(e, 1));
  auto r = ApplyTest(e.name, x, args.positional.empty() ? nullptr : &args.positional[0]);
  if (!r.ok()) return ErrorAt(e.pos, std::string(r.status().message()));
  return Value::Of(*r != e.negated);
}

}  // namespace

bool IsKnownFilter(std::string_view name) { return Contains(kFilters, name); }
bool IsKnownTest(std::string_view name) { return Contains(kTests, name); }
bool IsKnownFunction(std::string_view name) { return Contains(kFunctions, name); }
bool IsKnownMethod(std::string_view name) { return Contains(kMethods, name); }

absl::StatusOr<std::string> Template::Render(const Json& context,
                                             const RenderLimits& limits) const {
  Renderer r(source_name_, context, limits);
  std::string out;
  Flow flow = Flow::kNormal;
  TOKENLAKE_RETURN_IF_ERROR(r.Exec(*root_, &out, &flow));
  return out;
}

}  // namespace tokenlake::tokenizer::jinja
