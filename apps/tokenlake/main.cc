// tokenlake: the one CLI of the project (sim, bench, generate, ...). Subcommands register
// themselves; see command.h.
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>

#include "CLI/CLI.hpp"
#include "command.h"

namespace tokenlake::cli {
namespace {

std::map<std::string, CommandSetup>& Registry() {
  static auto* registry = new std::map<std::string, CommandSetup>();
  return *registry;
}

}  // namespace

bool RegisterCommand(std::string_view name, CommandSetup setup) {
  Registry().emplace(std::string(name), setup);
  return true;
}

}  // namespace tokenlake::cli

int main(int argc, char** argv) {
  CLI::App app{
      "TokenLake: a unified segment-level prefix (KV) cache pool for LLM serving clusters.",
      "tokenlake"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tokenlake 0.1.0");
  int exit_code = 0;
  for (const auto& [name, setup] : tokenlake::cli::Registry()) setup(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
