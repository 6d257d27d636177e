#include "sdtrain/train/interrupt.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace sdtrain::train {

namespace {

std::atomic<int> g_pending{0};
struct sigaction g_previous_int;
struct sigaction g_previous_term;

void on_signal(int signal) {
  if (g_pending.load() == SIGINT && signal == SIGINT) {
    // Second Ctrl-C: the user does not want to wait for the checkpoint.
    static const char message[] = "\nsdtrain: interrupted again, exiting without a checkpoint\n";
    (void)!::write(STDERR_FILENO, message, sizeof message - 1);
    ::_exit(130);
  }
  if (g_pending.load() == 0) {
    static const char message[] = "\nsdtrain: stopping after this step and saving a checkpoint "
                                  "(Ctrl-C again to exit at once)\n";
    (void)!::write(STDERR_FILENO, message, sizeof message - 1);
  }
  g_pending.store(signal);
}

}  // namespace

InterruptWatch::InterruptWatch() {
  g_pending.store(0);
  struct sigaction action;
  std::memset(&action, 0, sizeof action);
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGINT, &action, &g_previous_int);
  ::sigaction(SIGTERM, &action, &g_previous_term);
}

InterruptWatch::~InterruptWatch() {
  ::sigaction(SIGINT, &g_previous_int, nullptr);
  ::sigaction(SIGTERM, &g_previous_term, nullptr);
}

int InterruptWatch::pending() { return g_pending.load(); }

ExitCode exit_code_for_signal(int signal) {
  return signal == SIGTERM ? ExitCode::interrupted_sigterm : ExitCode::interrupted_sigint;
}

}  // namespace sdtrain::train
