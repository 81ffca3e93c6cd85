// Chat templates against renderings by Jinja2 set up as transformers sets it up: the fixtures'
// templates (tests/fixtures/tokenizer, tools/make_tokenizer_fixtures.py) and small templates
// whose expected outputs were rendered by Jinja2 3.1 with trim_blocks and lstrip_blocks.
#include "tokenlake/tokenizer/chat_template.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::tokenizer {
namespace {

using jinja::Json;
using ::testing::HasSubstr;

std::string FixtureDir() {
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  return std::string(src != nullptr ? src : ".") + "/tests/fixtures/tokenizer";
}

class FixtureChatTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureChatTest, RenderingsMatchTheReference) {
  auto tok = Tokenizer::FromDir(FixtureDir() + "/" + GetParam());
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto tmpl = ChatTemplate::ForTokenizer(**tok);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  std::ifstream in(FixtureDir() + "/" + GetParam() + "_expected.json");
  std::stringstream buf;
  buf << in.rdbuf();
  const Json expected = Json::parse(buf.str(), nullptr, false);
  ASSERT_TRUE(expected.is_object());
  ASSERT_FALSE(expected["chats"].empty());
  ChatTemplateOptions options;
  options.bos_token = (*tok)->config().bos_token;
  options.eos_token = (*tok)->config().eos_token;
  for (const Json& chat : expected["chats"]) {
    options.add_generation_prompt = chat["add_generation_prompt"].get<bool>();
    auto text = tmpl->Render(chat["messages"], options);
    if (chat.contains("error")) {
      ASSERT_FALSE(text.ok()) << chat["messages"].dump();
      EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_EQ(text.status().message(), chat["error"].get<std::string>());
      continue;
    }
    ASSERT_TRUE(text.ok()) << text.status() << " for " << chat["messages"].dump();
    EXPECT_EQ(*text, chat["text"].get<std::string>()) << chat["messages"].dump();
    if (chat.contains("ids")) {
      auto ids = (*tok)->Encode(*text, /*add_special_tokens=*/false);
      ASSERT_TRUE(ids.ok());
      EXPECT_EQ(*ids, chat["ids"].get<std::vector<int32_t>>());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureChatTest,
                         ::testing::Values("bpe_llama3", "bpe_gpt2", "bpe_qwen2", "spm_llama2"));

absl::StatusOr<std::string> Render(const std::string& source, const Json& vars,
                                   const jinja::RenderLimits& limits = {}) {
  auto t = jinja::Template::Parse(source, "t.jinja");
  if (!t.ok()) return t.status();
  return t->Render(vars, limits);
}

TEST(ChatTemplateTest, RendersLikeJinja2) {
  struct Case {
    std::string source;
    Json vars;
    std::string expected;  // Jinja2 3.1's output
  };
  const std::vector<Case> cases = {
      {"{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m.role }}{% if loop.first "
       "%}F{% endif %}{% if loop.last %}L{% endif %} {% endfor %}",
       Json::parse(R"({"messages":[{"role":"a"},{"role":"b"},{"role":"c"}]})"),
       "1/3:aF 2/3:b 3/3:cL "},
      {"{% set ns = namespace(n=0) %}{% for x in [1,2,3] %}{% set ns.n = ns.n + x %}{% endfor "
       "%}{{ ns.n }}",
       Json::object(), "6"},
      {"{{ 'a' ~ 1 ~ none ~ true }} {{ [1, 'x', none, false, 2.5] }} {{ {'k': [1, {'z': "
       "'\xC3\xA9'}]} | tojson }} {{ 'x' in 'xyz' }} {{ 3 not in [1, 2] }}",
       Json::object(),
       "a1NoneTrue [1, 'x', None, False, 2.5] {\"k\": [1, {\"z\": \"\xC3\xA9\"}]} True True"},
      {"{{ [7 // 2, -7 % 3, 10 / 4, 2 ** 10, 1e21, 0.1 + 0.2] }}", Json::object(),
       "[3, 2, 2.5, 1024, 1e+21, 0.30000000000000004]"},
      {"{{ '  hi  ' | trim }}|{{ 'Hello' | upper }}|{{ 'Hello' | lower }}|{{ [1,2,3] | length "
       "}}|{{ '\xC3\xBCn\xC3\xAF' | length }}|{{ x | default('d') }}|{{ 'a,b' .split(',') }}",
       Json::object(), "hi|HELLO|hello|3|3|d|['a', 'b']"},
      {"{% if a is defined and not b %}yes{% elif c %}c{% else %}no{% endif %}|{{ 'T' if a else "
       "'F' }}|{{ messages[1:] | length }}|{{ 'abc'[::-1] }}",
       Json::parse(R"({"a":1,"messages":[1,2,3]})"), "yes|T|2|cba"},
      {"  {% if true %}\n  x\n  {% endif %}\n{#- comment -#}\n  {{- 'y' -}}  \nz\n", Json::object(),
       "  x\nyz"},
      {"{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for x in [1,2,3,4] if x is "
       "even %}{{ x }}{% else %}none{% endfor %}{% for x in [] %}{% else %}empty{% endfor %}",
       Json::parse(R"({"d":{"b":1,"a":2}})"), "b=1;a=2;24empty"},
      {"{% for x in range(5) %}{% if x == 1 %}{% continue %}{% endif %}{% if x == 3 %}{% break "
       "%}{% endif %}{{ x }}{% endfor %}|{{ msgs | selectattr('role', 'equalto', 'user') | "
       "map(attribute='content') | join(', ') }}",
       Json::parse(R"({"msgs":[{"role":"user","content":"a"},{"role":"sys","content":"b"},
                               {"role":"user","content":"c"}]})"),
       "02|a, c"},
      {"{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}|{{ tools | "
       "tojson(indent=2) }}",
       Json::parse(R"({"tools":[{"name":"f","args":{"a":1}}]})"),
       "21|[\n  {\n    \"name\": \"f\",\n    \"args\": {\n      \"a\": 1\n    }\n  }\n]"},
  };
  for (const Case& c : cases) {
    auto out = Render(c.source, c.vars);
    ASSERT_TRUE(out.ok()) << out.status() << "\n" << c.source;
    EXPECT_EQ(*out, c.expected) << c.source;
  }
}

TEST(ChatTemplateTest, RefusesUnsupportedJinjaNamingConstructAndPosition) {
  struct Case {
    std::string source;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"hello\n  {% macro f(x) %}{{ x }}{% endmacro %}", absl::StatusCode::kUnimplemented,
       "t.jinja: line 2, column 6: unsupported tag 'macro'"},
      {"{{ x | wordcount }}", absl::StatusCode::kUnimplemented,
       "line 1, column 8: unsupported filter 'wordcount'"},
      {"{{ x is divisibleby(3) }}", absl::StatusCode::kUnimplemented,
       "unsupported test 'divisibleby'"},
      {"{{ cycler(1, 2) }}", absl::StatusCode::kUnimplemented, "unsupported function 'cycler'"},
      {"{{ m.content.format(1) }}", absl::StatusCode::kUnimplemented,
       "unsupported method 'format'"},
      {"{% set a, b = 1, 2 %}", absl::StatusCode::kUnimplemented, "tuple assignment"},
      {"{% set x %}block{% endset %}", absl::StatusCode::kUnimplemented, "block 'set'"},
      {"{% if x %}open", absl::StatusCode::kInvalidArgument, "missing 'endif'"},
      {"{{ 'unterminated }}", absl::StatusCode::kInvalidArgument, "unterminated string literal"},
      {"{{ x + }}", absl::StatusCode::kInvalidArgument, "line 1, column 8: unexpected end of tag"},
      {"{% endfor %}", absl::StatusCode::kInvalidArgument, "unexpected 'endfor'"},
      {"{{ a $ b }}", absl::StatusCode::kInvalidArgument, "unexpected character '$'"},
  };
  for (const Case& c : cases) {
    auto t = jinja::Template::Parse(c.source, "t.jinja");
    ASSERT_FALSE(t.ok()) << c.source;
    EXPECT_EQ(t.status().code(), c.code) << t.status();
    EXPECT_THAT(t.status().message(), HasSubstr(c.message)) << c.source;
  }
}

TEST(ChatTemplateTest, RunTimeErrorsNameTheirPosition) {
  auto undefined = Render("ok\n{{ nothing.field }}", Json::object());
  ASSERT_FALSE(undefined.ok());
  EXPECT_THAT(undefined.status().message(), HasSubstr("t.jinja: line 2, column 11"));
  EXPECT_THAT(undefined.status().message(), HasSubstr("of an undefined value"));
  auto mixed = Render("{{ 'a' + 1 }}", Json::object());
  ASSERT_FALSE(mixed.ok());
  EXPECT_THAT(mixed.status().message(), HasSubstr("unsupported operand types for +"));
  auto raised = Render("{{ raise_exception('Roles must alternate') }}", Json::object());
  EXPECT_EQ(raised.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(raised.status().message(), "Roles must alternate");
}

// Templates come from checkpoint folders; one that would recurse, loop or grow without bound
// is stopped with an error instead.
TEST(ChatTemplateTest, BoundsDepthStepsAndSize) {
  const std::string deep = std::string(300, '(') + "1" + std::string(300, ')');
  auto parsed = jinja::Template::Parse("{{ " + deep + " }}", "t.jinja");
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(parsed.status().message(), HasSubstr("nested more than 200 levels deep"));
  std::string blocks;
  for (int i = 0; i < 300; ++i) blocks += "{% if true %}";
  EXPECT_THAT(jinja::Template::Parse(blocks, "t").status().message(), HasSubstr("nested"));

  // Small limits keep the test fast; the defaults are the same code with larger numbers.
  jinja::RenderLimits small;
  small.max_steps = 10'000;
  small.max_bytes = 1 << 16;
  auto spin =
      Render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
             Json::object(), small);
  ASSERT_FALSE(spin.ok());
  EXPECT_THAT(spin.status().message(), HasSubstr("ran more than 10000 steps"));
  auto within = Render("{% for i in range(100) %}{{ i }}{% endfor %}", Json::object(), small);
  ASSERT_TRUE(within.ok()) << within.status();
  auto grow = Render(
      "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
      "{% endfor %}",
      Json::object(), small);
  ASSERT_FALSE(grow.ok());
  EXPECT_THAT(grow.status().message(), HasSubstr("a value longer than"));
  auto repeat = Render("{{ 'x' * 1000000000000 }}", Json::object(), small);
  ASSERT_FALSE(repeat.ok());
  EXPECT_THAT(repeat.status().message(), HasSubstr("repetition"));
}

TEST(ChatTemplateTest, RefusesMalformedMessages) {
  auto t = ChatTemplate::Create("{% for m in messages %}{{ m.content }}{% endfor %}", "t");
  ASSERT_TRUE(t.ok());
  struct Case {
    Json messages;
    std::string message;
  };
  const std::vector<Case> cases = {
      {Json::object(), "messages must be an array"},
      {Json::parse(R"([{"role":"user","content":"a"}, 3])"), "messages[1] must be an object"},
      {Json::parse(R"([{"content":"a"}])"), "messages[0].role must be a string"},
      {Json::parse(R"([{"role":"user","content":5}])"), "messages[0].content must be"},
  };
  for (const Case& c : cases) {
    auto out = t->Render(c.messages, {});
    ASSERT_FALSE(out.ok());
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(out.status().message(), HasSubstr(c.message));
  }
  auto ok = t->Render(Json::parse(R"([{"role":"user","content":"hi"}])"), {});
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, "hi");
}

}  // namespace
}  // namespace tokenlake::tokenizer
