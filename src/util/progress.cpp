#include "sdtrain/util/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iomanip>
#include <sstream>

#include "sdtrain/util/log.h"

namespace sdtrain {

namespace {

constexpr int kBarWidth = 24;

}  // namespace

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string format_number(double value, int precision) {
  std::ostringstream out;
  out << std::setprecision(precision) << value;
  return out.str();
}

std::string format_gib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GiB",
                static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return text;
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto total = static_cast<int64_t>(std::llround(seconds));
  char text[32];
  if (total >= 3600) {
    std::snprintf(text, sizeof text, "%lldh%02lldm", static_cast<long long>(total / 3600),
                  static_cast<long long>(total % 3600 / 60));
  } else if (total >= 60) {
    std::snprintf(text, sizeof text, "%lldm%02llds", static_cast<long long>(total / 60),
                  static_cast<long long>(total % 60));
  } else {
    std::snprintf(text, sizeof text, "%llds", static_cast<long long>(total));
  }
  return text;
}

Progress::Progress(std::string label, int64_t total, int64_t start, double plain_interval_seconds)
    : label_(std::move(label)),
      total_(total),
      start_(start),
      done_(start),
      interactive_(::isatty(STDERR_FILENO) == 1),
      plain_interval_(plain_interval_seconds),
      started_(std::chrono::steady_clock::now()),
      last_plain_(started_) {}

Progress::~Progress() {
  if (!finished_) finish();
}

double Progress::items_per_second() const {
  const double elapsed = seconds_since(started_);
  return elapsed > 0 ? static_cast<double>(done_ - start_) / elapsed : 0.0;
}

std::string Progress::line() const {
  std::ostringstream out;
  out << label_ << " " << done_ << "/" << total_;
  const double rate = items_per_second();
  if (done_ > start_) {
    if (rate >= 1.0 || rate == 0.0) {
      out << "  " << std::fixed;
      out.precision(2);
      out << rate << " it/s";
    } else {
      out << "  " << std::fixed;
      out.precision(2);
      out << 1.0 / rate << " s/it";
    }
    out << "  ETA " << format_duration(static_cast<double>(total_ - done_) / rate);
  }
  if (!fields_.empty()) out << "  " << fields_;
  return out.str();
}

void Progress::draw() {
  if (interactive_) {
    const double fraction = total_ > 0 ? static_cast<double>(done_) / total_ : 1.0;
    const int filled = static_cast<int>(fraction * kBarWidth);
    std::string bar = "[" + std::string(filled, '#') + std::string(kBarWidth - filled, '.') + "] ";
    std::fprintf(stderr, "\r\033[2K%s%s", bar.c_str(), line().c_str());
    std::fflush(stderr);
    drawn_ = true;
  } else if (seconds_since(last_plain_) >= plain_interval_ || done_ == total_) {
    last_plain_ = std::chrono::steady_clock::now();
    logged_done_ = done_;
    log::info(line());
  }
}

void Progress::update(int64_t done, const std::string& fields) {
  done_ = done;
  fields_ = fields;
  draw();
}

void Progress::note(const std::string& message) {
  if (interactive_ && drawn_) std::fprintf(stderr, "\r\033[2K");
  log::info(message);
  if (interactive_ && drawn_) draw();
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  if (interactive_) {
    if (drawn_) std::fprintf(stderr, "\n");
  } else if (logged_done_ != done_) {
    log::info(line());
  }
}

}  // namespace sdtrain
