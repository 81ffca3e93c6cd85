// Lexer and parser of the Jinja subset (jinja.h); the evaluator is jinja_eval.cc.
#include <cctype>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/tokenizer/jinja.h"
#include "tokenlake/tokenizer/utf8.h"

namespace tokenlake::tokenizer::jinja {
namespace {

struct Token {
  enum class Kind { kName, kInt, kFloat, kString, kOp, kEnd };
  Kind kind = Kind::kEnd;
  std::string text;  // name, operator, or the decoded string
  Json number;
  Pos pos;
};

// One piece of template source: text, or a tag's tokens.
struct Chunk {
  enum class Kind { kText, kOutput, kBlock };
  Kind kind = Kind::kText;
  std::string text;
  std::vector<Token> tokens;  // ends with a kEnd token
  Pos pos;
};

class Lexer {
 public:
  Lexer(std::string_view src, const std::string& name) : src_(src), name_(name) {}

  absl::StatusOr<std::vector<Chunk>> Run() {
    std::vector<Chunk> chunks;
    bool strip_next_ws = false;   // the previous tag ended with '-'
    bool trim_next_line = false;  // the previous tag was a block or comment (trim_blocks)
    size_t pos = 0;
    while (pos <= src_.size()) {
      size_t open = src_.find('{', pos);
      while (open != std::string_view::npos && open + 1 < src_.size() && src_[open + 1] != '{' &&
             src_[open + 1] != '%' && src_[open + 1] != '#') {
        open = src_.find('{', open + 1);
      }
      if (open != std::string_view::npos && open + 1 >= src_.size()) open = std::string_view::npos;
      const size_t text_end = open == std::string_view::npos ? src_.size() : open;
      std::string text(src_.substr(pos, text_end - pos));
      if (strip_next_ws) {
        size_t i = 0;
        while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
        text.erase(0, i);
      } else if (trim_next_line) {
        if (text.rfind("\r\n", 0) == 0) {
          text.erase(0, 2);
        } else if (!text.empty() && (text[0] == '\n' || text[0] == '\r')) {
          text.erase(0, 1);
        }
      }
      if (open == std::string_view::npos) {
        // keep_trailing_newline is off: one final newline is dropped.
        if (!text.empty() && text.back() == '\n') text.pop_back();
        if (!text.empty() && text.back() == '\r') text.pop_back();
        if (!text.empty()) chunks.push_back({Chunk::Kind::kText, std::move(text), {}, PosOf(pos)});
        break;
      }
      const char kind = src_[open + 1];
      size_t inner = open + 2;
      bool strip_before = false;
      bool keep_indent = false;
      if (inner < src_.size() && src_[inner] == '-') {
        strip_before = true;
        ++inner;
      } else if (inner < src_.size() && src_[inner] == '+' && kind != '{') {
        keep_indent = true;
        ++inner;
      }
      if (strip_before) {
        size_t e = text.size();
        while (e > 0 && std::isspace(static_cast<unsigned char>(text[e - 1]))) --e;
        text.resize(e);
      } else if (kind != '{' && !keep_indent) {
        // lstrip_blocks: spaces and tabs from the start of the line up to a block or comment
        // (judged on the source, before trim_blocks took the newline away).
        size_t i = open;
        while (i > 0 && (src_[i - 1] == ' ' || src_[i - 1] == '\t')) --i;
        if (i == 0 || src_[i - 1] == '\n' || src_[i - 1] == '\r') {
          const size_t n = open - i;
          text.resize(text.size() >= n ? text.size() - n : 0);
        }
      }
      if (!text.empty()) chunks.push_back({Chunk::Kind::kText, std::move(text), {}, PosOf(pos)});

      strip_next_ws = false;
      trim_next_line = kind != '{';
      if (kind == '#') {
        const size_t close = src_.find("#}", inner);
        if (close == std::string_view::npos) return Error(open, "unterminated comment");
        strip_next_ws = close > inner && src_[close - 1] == '-';
        pos = close + 2;
        continue;
      }
      Chunk tag;
      tag.kind = kind == '{' ? Chunk::Kind::kOutput : Chunk::Kind::kBlock;
      tag.pos = PosOf(open);
      size_t p = inner;
      TOKENLAKE_RETURN_IF_ERROR(LexTag(kind == '{' ? '}' : '%', &p, &tag.tokens, &strip_next_ws));
      pos = p;
      chunks.push_back(std::move(tag));
    }
    return chunks;
  }

 private:
  Pos PosOf(size_t offset) const {
    Pos p;
    for (size_t i = 0; i < offset && i < src_.size(); ++i) {
      if (src_[i] == '\n') {
        ++p.line;
        p.column = 1;
      } else if ((static_cast<uint8_t>(src_[i]) & 0xC0) != 0x80) {
        ++p.column;
      }
    }
    return p;
  }

  absl::Status Error(size_t offset, const std::string& what) const {
    const Pos p = PosOf(offset);
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": line ", p.line, ", column ", p.column, ": ", what));
  }

  // Tokens of a tag up to its closing `close`}; *p starts after the opening delimiter.
  absl::Status LexTag(char close, size_t* p, std::vector<Token>* out, bool* strip_after) {
    size_t i = *p;
    size_t close_at = 0;
    static constexpr std::string_view kOps3[] = {"**", "//", "==", "!=", "<=", ">="};
    while (true) {
      while (i < src_.size() && std::isspace(static_cast<unsigned char>(src_[i]))) ++i;
      if (i >= src_.size()) return Error(*p, "unterminated tag");
      // The end of the tag, optionally with '-'.
      if (src_.substr(i, 3) == std::string{'-', close, '}'}) {
        *strip_after = true;
        close_at = i;
        i += 3;
        break;
      }
      if (src_.substr(i, 2) == std::string{close, '}'}) {
        close_at = i;
        i += 2;
        break;
      }
      Token t;
      t.pos = PosOf(i);
      const char c = src_[i];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t j = i;
        while (j < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[j])) || src_[j] == '_'))
          ++j;
        t.kind = Token::Kind::kName;
        t.text = std::string(src_.substr(i, j - i));
        i = j;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t j = i;
        while (j < src_.size() &&
               (std::isdigit(static_cast<unsigned char>(src_[j])) || src_[j] == '_'))
          ++j;
        bool is_float = false;
        if (j + 1 < src_.size() && src_[j] == '.' &&
            std::isdigit(static_cast<unsigned char>(src_[j + 1]))) {
          is_float = true;
          ++j;
          while (j < src_.size() && std::isdigit(static_cast<unsigned char>(src_[j]))) ++j;
        }
        if (j < src_.size() && (src_[j] == 'e' || src_[j] == 'E')) {
          size_t k = j + 1;
          if (k < src_.size() && (src_[k] == '+' || src_[k] == '-')) ++k;
          if (k < src_.size() && std::isdigit(static_cast<unsigned char>(src_[k]))) {
            is_float = true;
            j = k;
            while (j < src_.size() && std::isdigit(static_cast<unsigned char>(src_[j]))) ++j;
          }
        }
        std::string digits;
        for (char d : src_.substr(i, j - i)) {
          if (d != '_') digits += d;
        }
        if (is_float) {
          t.kind = Token::Kind::kFloat;
          t.number = std::strtod(digits.c_str(), nullptr);
        } else {
          t.kind = Token::Kind::kInt;
          errno = 0;
          const long long v = std::strtoll(digits.c_str(), nullptr, 10);
          if (errno != 0) return Error(i, "integer literal out of range");
          t.number = static_cast<int64_t>(v);
        }
        i = j;
      } else if (c == '\'' || c == '"') {
        t.kind = Token::Kind::kString;
        size_t j = i + 1;
        while (true) {
          if (j >= src_.size()) return Error(i, "unterminated string literal");
          const char d = src_[j];
          if (d == c) break;
          if (d != '\\' || j + 1 >= src_.size()) {
            t.text += d;
            ++j;
            continue;
          }
          const char e = src_[j + 1];
          j += 2;
          switch (e) {
            case 'n':
              t.text += '\n';
              break;
            case 't':
              t.text += '\t';
              break;
            case 'r':
              t.text += '\r';
              break;
            case '0':
              t.text += '\0';
              break;
            case '\\':
              t.text += '\\';
              break;
            case '\'':
              t.text += '\'';
              break;
            case '"':
              t.text += '"';
              break;
            case '\n':
              break;
            case 'x':
            case 'u':
            case 'U': {
              const size_t n = e == 'x' ? 2 : (e == 'u' ? 4 : 8);
              if (j + n > src_.size()) return Error(j - 2, "truncated escape in string literal");
              uint32_t cp = 0;
              for (size_t k = 0; k < n; ++k) {
                const char h = src_[j + k];
                if (!std::isxdigit(static_cast<unsigned char>(h))) {
                  return Error(j - 2, "bad escape in string literal");
                }
                cp = cp * 16 + (std::isdigit(static_cast<unsigned char>(h))
                                    ? h - '0'
                                    : (std::tolower(h) - 'a' + 10));
              }
              if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
                return Error(j - 2, "escape is not a Unicode scalar value");
              }
              AppendCodePoint(cp, &t.text);
              j += n;
              break;
            }
            default:  // Python keeps unknown escapes as written
              t.text += '\\';
              t.text += e;
          }
        }
        i = j + 1;
      } else {
        t.kind = Token::Kind::kOp;
        bool two = false;
        for (std::string_view op : kOps3) {
          if (src_.substr(i, 2) == op) {
            t.text = std::string(op);
            two = true;
            break;
          }
        }
        if (!two) {
          static constexpr std::string_view kOps1 = "+-*/%~<>=()[]{},.:|";
          if (kOps1.find(c) == std::string_view::npos) {
            return Error(i, absl::StrCat("unexpected character '", std::string(1, c), "'"));
          }
          t.text = std::string(1, c);
        }
        i += t.text.size();
      }
      out->push_back(std::move(t));
    }
    Token end;
    end.pos = PosOf(close_at);
    out->push_back(end);
    *p = i;
    return absl::OkStatus();
  }

  std::string_view src_;
  const std::string& name_;
};

class Parser {
 public:
  // Nesting (blocks, parentheses, unary operators) beyond this is refused: the parser and the
  // evaluator recurse, and no real template comes near it.
  static constexpr int kMaxDepth = 200;

  Parser(std::vector<Chunk> chunks, const std::string& name)
      : chunks_(std::move(chunks)), name_(name) {}

  absl::StatusOr<NodeList> Run() {
    NodeList nodes;
    std::string end;
    TOKENLAKE_RETURN_IF_ERROR(ParseBody({}, &nodes, &end));
    return nodes;
  }

 private:
  struct DepthGuard {
    explicit DepthGuard(Parser* p) : parser(p) { ++parser->depth_; }
    ~DepthGuard() { --parser->depth_; }
    Parser* parser;
  };
  absl::Status TooDeep() const {
    const Pos p = toks_ != nullptr ? Peek().pos : Pos{};
    return ErrorAt(p, absl::StrCat("nested more than ", kMaxDepth, " levels deep"), true);
  }

  absl::Status ErrorAt(Pos p, const std::string& what, bool unsupported = false) const {
    const std::string m = absl::StrCat(name_, ": line ", p.line, ", column ", p.column, ": ", what);
    return unsupported ? absl::UnimplementedError(m) : absl::InvalidArgumentError(m);
  }

  // Parses chunks into `out` until a block tag whose keyword is in `ends` (its keyword is
  // stored in *end and the tag's tokens are left for the caller at tok_).
  absl::Status ParseBody(const std::vector<std::string>& ends, NodeList* out, std::string* end) {
    DepthGuard guard(this);
    if (depth_ > kMaxDepth) return TooDeep();
    while (chunk_ < chunks_.size()) {
      Chunk& c = chunks_[chunk_];
      if (c.kind == Chunk::Kind::kText) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kText;
        n->pos = c.pos;
        n->text = std::move(c.text);
        out->push_back(std::move(n));
        ++chunk_;
        continue;
      }
      toks_ = &c.tokens;
      tok_ = 0;
      if (c.kind == Chunk::Kind::kOutput) {
        ++chunk_;
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kOutput;
        n->pos = c.pos;
        TOKENLAKE_ASSIGN_OR_RETURN(n->expr, ParseExpr());
        TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
        out->push_back(std::move(n));
        continue;
      }
      const Token& kw = Peek();
      if (kw.kind != Token::Kind::kName) return ErrorAt(kw.pos, "expected a statement keyword");
      for (const std::string& e : ends) {
        if (kw.text == e) {
          *end = e;
          ++tok_;
          ++chunk_;
          return absl::OkStatus();
        }
      }
      ++chunk_;
      ++tok_;
      auto n = std::make_unique<Node>();
      n->pos = kw.pos;
      if (kw.text == "for") {
        TOKENLAKE_RETURN_IF_ERROR(ParseFor(n.get()));
      } else if (kw.text == "if") {
        TOKENLAKE_RETURN_IF_ERROR(ParseIf(n.get()));
      } else if (kw.text == "set") {
        TOKENLAKE_RETURN_IF_ERROR(ParseSet(n.get()));
      } else if (kw.text == "break" || kw.text == "continue") {
        n->kind = kw.text == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
        TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
      } else if (kw.text == "generation") {
        n->kind = Node::Kind::kBlock;
        TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
        std::string e;
        TOKENLAKE_RETURN_IF_ERROR(ParseBody({"endgeneration"}, &n->body, &e));
        TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
      } else {
        static const char* const kKnown[] = {"endfor", "endif", "elif", "else", "endgeneration"};
        for (const char* k : kKnown) {
          if (kw.text == k) return ErrorAt(kw.pos, absl::StrCat("unexpected '", kw.text, "'"));
        }
        return ErrorAt(kw.pos, absl::StrCat("unsupported tag '", kw.text, "'"), true);
      }
      out->push_back(std::move(n));
    }
    if (!ends.empty()) {
      const Pos p = chunks_.empty() ? Pos{} : chunks_.back().pos;
      return ErrorAt(p, absl::StrCat("missing '", ends.back(), "'"));
    }
    return absl::OkStatus();
  }

  absl::Status ParseFor(Node* n) {
    n->kind = Node::Kind::kFor;
    do {
      const Token& t = Next();
      if (t.kind != Token::Kind::kName) return ErrorAt(t.pos, "expected a loop variable");
      n->targets.push_back(t.text);
    } while (AcceptOp(","));
    if (!AcceptName("in")) return ErrorAt(Peek().pos, "expected 'in'");
    TOKENLAKE_ASSIGN_OR_RETURN(n->expr, ParseOr());
    if (AcceptName("if")) {
      TOKENLAKE_ASSIGN_OR_RETURN(n->cond, ParseOr());
    }
    if (AcceptName("recursive")) return ErrorAt(Peek().pos, "unsupported 'recursive' loop", true);
    TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
    std::string end;
    TOKENLAKE_RETURN_IF_ERROR(ParseBody({"else", "endfor"}, &n->body, &end));
    TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
    if (end == "else") {
      TOKENLAKE_RETURN_IF_ERROR(ParseBody({"endfor"}, &n->else_body, &end));
      TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
    }
    return absl::OkStatus();
  }

  absl::Status ParseIf(Node* n) {
    DepthGuard guard(this);
    if (depth_ > kMaxDepth) return TooDeep();
    n->kind = Node::Kind::kIf;
    TOKENLAKE_ASSIGN_OR_RETURN(n->expr, ParseExpr());
    TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
    std::string end;
    TOKENLAKE_RETURN_IF_ERROR(ParseBody({"elif", "else", "endif"}, &n->body, &end));
    if (end == "elif") {
      auto elif = std::make_unique<Node>();
      elif->pos = Peek().pos;
      TOKENLAKE_RETURN_IF_ERROR(ParseIf(elif.get()));  // consumes through endif
      n->else_body.push_back(std::move(elif));
      return absl::OkStatus();
    }
    TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
    if (end == "else") {
      TOKENLAKE_RETURN_IF_ERROR(ParseBody({"endif"}, &n->else_body, &end));
      TOKENLAKE_RETURN_IF_ERROR(ExpectEnd());
    }
    return absl::OkStatus();
  }

  absl::Status ParseSet(Node* n) {
    n->kind = Node::Kind::kSet;
    const Token& t = Next();
    if (t.kind != Token::Kind::kName) return ErrorAt(t.pos, "expected a variable name");
    n->targets.push_back(t.text);
    if (AcceptOp(".")) {
      const Token& a = Next();
      if (a.kind != Token::Kind::kName) return ErrorAt(a.pos, "expected an attribute name");
      n->attr = a.text;
    } else if (Peek().kind == Token::Kind::kOp && Peek().text == ",") {
      return ErrorAt(Peek().pos, "unsupported tuple assignment in 'set'", true);
    }
    if (Peek().kind == Token::Kind::kEnd) {
      return ErrorAt(Peek().pos, "unsupported block 'set' (set ... endset)", true);
    }
    if (!AcceptOp("=")) return ErrorAt(Peek().pos, "expected '='");
    TOKENLAKE_ASSIGN_OR_RETURN(n->expr, ParseExpr());
    return ExpectEnd();
  }

  // --- expressions -------------------------------------------------------------------------
  const Token& Peek() const { return (*toks_)[tok_]; }
  const Token& Next() {
    const Token& t = (*toks_)[tok_];
    if (t.kind != Token::Kind::kEnd) ++tok_;
    return t;
  }
  bool AcceptOp(std::string_view op) {
    if (Peek().kind == Token::Kind::kOp && Peek().text == op) {
      ++tok_;
      return true;
    }
    return false;
  }
  bool AcceptName(std::string_view name) {
    if (Peek().kind == Token::Kind::kName && Peek().text == name) {
      ++tok_;
      return true;
    }
    return false;
  }
  bool PeekName(std::string_view name, size_t ahead = 0) const {
    const Token& t = (*toks_)[std::min(tok_ + ahead, toks_->size() - 1)];
    return t.kind == Token::Kind::kName && t.text == name;
  }
  absl::Status ExpectEnd() {
    if (Peek().kind != Token::Kind::kEnd) {
      return ErrorAt(Peek().pos, absl::StrCat("unexpected '", Peek().text, "'"));
    }
    return absl::OkStatus();
  }
  static ExprPtr Make(Expr::Kind kind, Pos pos, std::string name = "") {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->pos = pos;
    e->name = std::move(name);
    return e;
  }
  static ExprPtr Binary(std::string op, Pos pos, ExprPtr a, ExprPtr b) {
    ExprPtr e = Make(Expr::Kind::kBinary, pos, std::move(op));
    e->items.push_back(std::move(a));
    e->items.push_back(std::move(b));
    return e;
  }

  // expr := or ['if' or ['else' expr]]
  absl::StatusOr<ExprPtr> ParseExpr() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr value, ParseOr());
    while (PeekName("if")) {
      const Pos pos = Next().pos;
      ExprPtr e = Make(Expr::Kind::kCond, pos);
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr cond, ParseOr());
      ExprPtr other;
      if (AcceptName("else")) {
        TOKENLAKE_ASSIGN_OR_RETURN(other, ParseExpr());
      }
      e->items.push_back(std::move(cond));
      e->items.push_back(std::move(value));
      e->items.push_back(std::move(other));
      value = std::move(e);
    }
    return value;
  }
  absl::StatusOr<ExprPtr> ParseOr() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr left, ParseAnd());
    while (PeekName("or")) {
      const Pos pos = Next().pos;
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr right, ParseAnd());
      left = Binary("or", pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseAnd() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr left, ParseNot());
    while (PeekName("and")) {
      const Pos pos = Next().pos;
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr right, ParseNot());
      left = Binary("and", pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseNot() {
    DepthGuard guard(this);
    if (depth_ > kMaxDepth) return TooDeep();
    if (PeekName("not")) {
      const Pos pos = Next().pos;
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr x, ParseNot());
      ExprPtr e = Make(Expr::Kind::kUnary, pos, "not");
      e->items.push_back(std::move(x));
      return e;
    }
    return ParseCompare();
  }
  absl::StatusOr<ExprPtr> ParseCompare() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr left, ParseMath1());
    while (true) {
      const Token& t = Peek();
      std::string op;
      if (t.kind == Token::Kind::kOp && (t.text == "==" || t.text == "!=" || t.text == "<" ||
                                         t.text == "<=" || t.text == ">" || t.text == ">=")) {
        op = t.text;
        ++tok_;
      } else if (PeekName("in")) {
        op = "in";
        ++tok_;
      } else if (PeekName("not") && PeekName("in", 1)) {
        op = "not in";
        tok_ += 2;
      } else {
        break;
      }
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr right, ParseMath1());
      left = Binary(op, t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseMath1() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr left, ParseConcat());
    while (Peek().kind == Token::Kind::kOp && (Peek().text == "+" || Peek().text == "-")) {
      const Token& t = Next();
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr right, ParseConcat());
      left = Binary(t.text, t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseConcat() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr left, ParseMath2());
    while (Peek().kind == Token::Kind::kOp && Peek().text == "~") {
      const Token& t = Next();
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr right, ParseMath2());
      left = Binary("~", t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseMath2() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr left, ParsePow());
    while (Peek().kind == Token::Kind::kOp && (Peek().text == "*" || Peek().text == "/" ||
                                               Peek().text == "//" || Peek().text == "%")) {
      const Token& t = Next();
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr right, ParsePow());
      left = Binary(t.text, t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParsePow() {
    TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr left, ParseUnary());
    while (Peek().kind == Token::Kind::kOp && Peek().text == "**") {
      const Token& t = Next();
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr right, ParseUnary());
      left = Binary("**", t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseUnary() {
    DepthGuard guard(this);
    if (depth_ > kMaxDepth) return TooDeep();
    ExprPtr e;
    if (Peek().kind == Token::Kind::kOp && (Peek().text == "-" || Peek().text == "+")) {
      const Token& t = Next();
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr x, ParseUnary());
      e = Make(Expr::Kind::kUnary, t.pos, t.text);
      e->items.push_back(std::move(x));
    } else {
      TOKENLAKE_ASSIGN_OR_RETURN(e, ParsePrimary());
      TOKENLAKE_ASSIGN_OR_RETURN(e, ParsePostfix(std::move(e)));
    }
    return ParseFilters(std::move(e));
  }

  absl::Status ParseArgs(Expr* call) {
    // After '(': positional then keyword arguments, up to ')'.
    while (!AcceptOp(")")) {
      if (call->items.size() > 1 && !AcceptOp(",")) {  // items[0] is the callee / operand
        return ErrorAt(Peek().pos, "expected ',' or ')'");
      }
      if (AcceptOp(")")) break;
      std::string kw;
      if (Peek().kind == Token::Kind::kName && (*toks_)[tok_ + 1].kind == Token::Kind::kOp &&
          (*toks_)[tok_ + 1].text == "=") {
        kw = Next().text;
        ++tok_;
      } else if (!call->kwarg_names.empty()) {
        return ErrorAt(Peek().pos, "positional argument after a keyword argument");
      }
      TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr arg, ParseExpr());
      call->items.push_back(std::move(arg));
      if (!kw.empty()) call->kwarg_names.push_back(kw);
      if (Peek().kind == Token::Kind::kEnd) return ErrorAt(Peek().pos, "missing ')'");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> ParseFilters(ExprPtr e) {
    while (true) {
      if (AcceptOp("|")) {
        const Token& t = Next();
        if (t.kind != Token::Kind::kName) return ErrorAt(t.pos, "expected a filter name");
        if (!IsKnownFilter(t.text)) {
          return ErrorAt(t.pos, absl::StrCat("unsupported filter '", t.text, "'"), true);
        }
        ExprPtr f = Make(Expr::Kind::kFilter, t.pos, t.text);
        f->items.push_back(std::move(e));
        if (AcceptOp("(")) TOKENLAKE_RETURN_IF_ERROR(ParseArgs(f.get()));
        e = std::move(f);
      } else if (PeekName("is")) {
        const Pos pos = Next().pos;
        const bool negated = AcceptName("not");
        const Token& t = Next();
        if (t.kind != Token::Kind::kName) return ErrorAt(t.pos, "expected a test name");
        if (!IsKnownTest(t.text)) {
          return ErrorAt(t.pos, absl::StrCat("unsupported test '", t.text, "'"), true);
        }
        ExprPtr test = Make(Expr::Kind::kTest, pos, t.text);
        test->negated = negated;
        test->items.push_back(std::move(e));
        if (AcceptOp("(")) {
          TOKENLAKE_RETURN_IF_ERROR(ParseArgs(test.get()));
        } else if (Peek().kind == Token::Kind::kString || Peek().kind == Token::Kind::kInt ||
                   Peek().kind == Token::Kind::kFloat) {
          TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
          test->items.push_back(std::move(arg));
        }
        e = std::move(test);
      } else {
        return e;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr e) {
    while (true) {
      const Token& t = Peek();
      if (AcceptOp(".")) {
        const Token& a = Next();
        if (a.kind != Token::Kind::kName && a.kind != Token::Kind::kInt) {
          return ErrorAt(a.pos, "expected an attribute name");
        }
        ExprPtr x =
            Make(Expr::Kind::kAttr, t.pos, a.kind == Token::Kind::kName ? a.text : a.number.dump());
        x->items.push_back(std::move(e));
        e = std::move(x);
      } else if (AcceptOp("[")) {
        std::vector<ExprPtr> parts(1);
        bool slice = false;
        while (!AcceptOp("]")) {
          if (AcceptOp(":")) {
            slice = true;
            parts.emplace_back();
            continue;
          }
          if (parts.back() != nullptr) return ErrorAt(Peek().pos, "expected ']'");
          TOKENLAKE_ASSIGN_OR_RETURN(parts.back(), ParseExpr());
          if (Peek().kind == Token::Kind::kEnd) return ErrorAt(Peek().pos, "missing ']'");
        }
        if (!slice && parts[0] == nullptr) return ErrorAt(t.pos, "empty subscript");
        if (parts.size() > 3) return ErrorAt(t.pos, "too many ':' in slice");
        ExprPtr x = Make(slice ? Expr::Kind::kSlice : Expr::Kind::kIndex, t.pos);
        x->items.push_back(std::move(e));
        for (auto& p : parts) x->items.push_back(std::move(p));
        e = std::move(x);
      } else if (AcceptOp("(")) {
        if (e->kind == Expr::Kind::kName && !IsKnownFunction(e->name)) {
          return ErrorAt(e->pos, absl::StrCat("unsupported function '", e->name, "'"), true);
        }
        if (e->kind == Expr::Kind::kAttr && !IsKnownMethod(e->name)) {
          return ErrorAt(e->pos, absl::StrCat("unsupported method '", e->name, "'"), true);
        }
        if (e->kind != Expr::Kind::kName && e->kind != Expr::Kind::kAttr) {
          return ErrorAt(t.pos, "only functions and methods can be called", true);
        }
        ExprPtr x = Make(Expr::Kind::kCall, t.pos);
        x->items.push_back(std::move(e));
        TOKENLAKE_RETURN_IF_ERROR(ParseArgs(x.get()));
        e = std::move(x);
      } else {
        return e;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Token& t = Next();
    switch (t.kind) {
      case Token::Kind::kString: {
        ExprPtr e = Make(Expr::Kind::kLiteral, t.pos);
        e->value = t.text;
        // Adjacent string literals concatenate.
        while (Peek().kind == Token::Kind::kString)
          e->value = e->value.get<std::string>() + Next().text;
        return e;
      }
      case Token::Kind::kInt:
      case Token::Kind::kFloat: {
        ExprPtr e = Make(Expr::Kind::kLiteral, t.pos);
        e->value = t.number;
        return e;
      }
      case Token::Kind::kName: {
        ExprPtr e = Make(Expr::Kind::kLiteral, t.pos);
        if (t.text == "true" || t.text == "True") {
          e->value = true;
        } else if (t.text == "false" || t.text == "False") {
          e->value = false;
        } else if (t.text == "none" || t.text == "None") {
          e->value = nullptr;
        } else {
          e->kind = Expr::Kind::kName;
          e->name = t.text;
        }
        return e;
      }
      case Token::Kind::kOp:
        if (t.text == "(") {
          TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr e, ParseExpr());
          if (Peek().kind == Token::Kind::kOp && Peek().text == ",") {
            // A tuple: read as a list.
            ExprPtr list = Make(Expr::Kind::kList, t.pos);
            list->items.push_back(std::move(e));
            while (AcceptOp(",")) {
              if (Peek().kind == Token::Kind::kOp && Peek().text == ")") break;
              TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpr());
              list->items.push_back(std::move(item));
            }
            e = std::move(list);
          }
          if (!AcceptOp(")")) return ErrorAt(Peek().pos, "expected ')'");
          return e;
        }
        if (t.text == "[") {
          ExprPtr list = Make(Expr::Kind::kList, t.pos);
          while (!AcceptOp("]")) {
            if (!list->items.empty() && !AcceptOp(","))
              return ErrorAt(Peek().pos, "expected ',' or ']'");
            if (AcceptOp("]")) break;
            TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpr());
            list->items.push_back(std::move(item));
          }
          return list;
        }
        if (t.text == "{") {
          ExprPtr dict = Make(Expr::Kind::kDict, t.pos);
          while (!AcceptOp("}")) {
            if (!dict->items.empty() && !AcceptOp(","))
              return ErrorAt(Peek().pos, "expected ',' or '}'");
            if (AcceptOp("}")) break;
            TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr key, ParseExpr());
            if (!AcceptOp(":")) return ErrorAt(Peek().pos, "expected ':'");
            TOKENLAKE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpr());
            dict->items.push_back(std::move(key));
            dict->items.push_back(std::move(value));
          }
          return dict;
        }
        return ErrorAt(t.pos, absl::StrCat("unexpected '", t.text, "'"));
      case Token::Kind::kEnd:
        return ErrorAt(t.pos, "unexpected end of tag");
    }
    return ErrorAt(t.pos, "unexpected token");
  }

  std::vector<Chunk> chunks_;
  const std::string& name_;
  size_t chunk_ = 0;
  const std::vector<Token>* toks_ = nullptr;
  size_t tok_ = 0;
  int depth_ = 0;
};

}  // namespace

absl::StatusOr<Template> Template::Parse(std::string_view source, const std::string& source_name) {
  TOKENLAKE_RETURN_IF_ERROR(ValidateUtf8(source, source_name));
  Lexer lexer(source, source_name);
  TOKENLAKE_ASSIGN_OR_RETURN(std::vector<Chunk> chunks, lexer.Run());
  Parser parser(std::move(chunks), source_name);
  TOKENLAKE_ASSIGN_OR_RETURN(NodeList nodes, parser.Run());
  Template t;
  t.root_ = std::make_shared<const NodeList>(std::move(nodes));
  t.source_name_ = source_name;
  return t;
}

}  // namespace tokenlake::tokenizer::jinja
