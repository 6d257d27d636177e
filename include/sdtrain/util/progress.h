#pragma once
// Progress of a long loop on stderr: a bar redrawn in place when stderr is a terminal
// (count/total, rate, ETA and caller-supplied fields such as loss and lr), and plain log lines
// every `plain_interval_seconds` otherwise (CI logs, `2> file`), so logs stay readable.

#include <chrono>
#include <cstdint>
#include <string>

namespace sdtrain {

class Progress {
 public:
  // `start` is where a resumed loop begins; rates count only the work done in this process.
  Progress(std::string label, int64_t total, int64_t start = 0,
           double plain_interval_seconds = 30.0);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // `done` items finished; `fields` is appended as is ("loss 0.123  lr 2e-06").
  void update(int64_t done, const std::string& fields = "");
  // A log line that does not tear the bar.
  void note(const std::string& message);
  // Final line (also drawn by the destructor if not called).
  void finish();

  double items_per_second() const;
  bool interactive() const { return interactive_; }

 private:
  void draw();
  std::string line() const;

  std::string label_;
  int64_t total_;
  int64_t start_;
  int64_t done_;
  std::string fields_;
  bool interactive_;
  bool finished_ = false;
  bool drawn_ = false;
  int64_t logged_done_ = -1;
  double plain_interval_;
  std::chrono::steady_clock::time_point started_;
  std::chrono::steady_clock::time_point last_plain_;
};

// Seconds from `start` until now.
double seconds_since(std::chrono::steady_clock::time_point start);
// "1h02m", "3m05s", "12s".
std::string format_duration(double seconds);
// `value` with `precision` significant digits, as std::ostream prints it ("0.1234", "2e-06").
std::string format_number(double value, int precision = 4);
// "9.35 GiB": bytes in GiB with two decimals.
std::string format_gib(int64_t bytes);

}  // namespace sdtrain
