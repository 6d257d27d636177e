#pragma once
// SIGINT (Ctrl-C) and SIGTERM (what a spot-instance reclaim or `docker stop` sends) during
// training: the first one is recorded and the run stops after the current step with a
// checkpoint; a second SIGINT exits at once (a checkpoint in progress stays .partial and is
// ignored on resume).

#include "sdtrain/util/error.h"

namespace sdtrain::train {

class InterruptWatch {
 public:
  InterruptWatch();   // installs the handlers
  ~InterruptWatch();  // restores the previous ones
  InterruptWatch(const InterruptWatch&) = delete;
  InterruptWatch& operator=(const InterruptWatch&) = delete;

  // The signal received (SIGINT or SIGTERM), or 0.
  static int pending();
};

// 143 for SIGTERM, 130 for SIGINT: the exit codes README documents.
ExitCode exit_code_for_signal(int signal);

}  // namespace sdtrain::train
