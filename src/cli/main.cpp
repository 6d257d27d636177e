#include "sdtrain/cli/cli.h"

int main(int argc, char** argv) { return sdtrain::cli::run(argc, argv); }
