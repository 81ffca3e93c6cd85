// tokenlake: the one CLI of the project (sim, bench, generate, ...). Subcommands register
// themselves; see command.h.
#include "command.h"

int main(int argc, char** argv) { return tokenlake::cli::RunCli(argc, argv); }
