// The `tokenlake` CLI's subcommand registry. Each subcommand lives in its own `*_command.cc`,
// compiled into the executable, and registers itself at static-initialisation time:
//
//   namespace {
//   void SetUpSim(CLI::App& app, int* exit_code) {
//     CLI::App* sim = app.add_subcommand("sim", "...");
//     ... options ...
//     sim->callback([=] { *exit_code = RunSim(...); });
//   }
//   }  // namespace
//   TOKENLAKE_REGISTER_COMMAND(sim, SetUpSim);
//
// A command reports failure by setting *exit_code non-zero (1 for a runtime error, 2 for bad
// usage) after printing a clear message on stderr; it never throws past its callback.
#ifndef TOKENLAKE_APPS_TOKENLAKE_COMMAND_H_
#define TOKENLAKE_APPS_TOKENLAKE_COMMAND_H_

#include <string_view>

namespace CLI {
class App;
}  // namespace CLI

namespace tokenlake::cli {

using CommandSetup = void (*)(CLI::App& app, int* exit_code);

// Registers a subcommand's set-up function. Returns true (for use in a static initialiser).
bool RegisterCommand(std::string_view name, CommandSetup setup);

// Parses argv (argv[0] is the program name) and runs the chosen subcommand; returns the exit
// code (0 success, 1 runtime error, 2 bad usage). Not reentrant: one call at a time.
int RunCli(int argc, const char* const* argv);

}  // namespace tokenlake::cli

#define TOKENLAKE_REGISTER_COMMAND(name, setup)                            \
  [[maybe_unused]] static const bool tokenlake_command_registered_##name = \
      ::tokenlake::cli::RegisterCommand(#name, setup)

#endif  // TOKENLAKE_APPS_TOKENLAKE_COMMAND_H_
