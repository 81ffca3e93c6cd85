// The `tokenlake` CLI's dispatcher (see command.h): builds the app from the registered
// subcommands and runs it. The executable's main() and the Python package's tokenlake.sim both
// call RunCli, so they parse the same flags and write the same JSON.
#include "CLI/CLI.hpp"

#include <map>
#include <string>

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

int RunCli(int argc, const char* const* argv) {
  CLI::App app{
      "TokenLake: a unified segment-level prefix (KV) cache pool for LLM serving clusters.",
      "tokenlake"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tokenlake 0.1.0");
  int exit_code = 0;
  for (const auto& [name, setup] : Registry()) setup(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Bad usage (unknown flag, missing or malformed value): CLI11 prints the message and a
    // hint; we exit 2, the convention for usage errors, whatever CLI11's internal code is.
    app.exit(e);
    return 2;
  }
  return exit_code;
}

}  // namespace tokenlake::cli
