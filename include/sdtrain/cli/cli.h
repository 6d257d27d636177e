#pragma once

namespace sdtrain::cli {

// The whole command line: parses arguments, runs the command, and turns every error into a
// message on stderr and the documented exit code (README "Exit codes"). Never throws.
int run(int argc, char** argv);

}  // namespace sdtrain::cli
