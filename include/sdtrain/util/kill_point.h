#pragma once
// Named points where a test can kill the run as `kill -9` or a power cut would: with
// SDTRAIN_KILL_AT=NAME#K set, the K-th time (default the first) the run reaches kill_point(NAME)
// it sends itself SIGKILL, so nothing is flushed, cleaned up or renamed after it (NAME#K@R: only
// in the data-parallel process whose RANK is R). The run-safety
// tests (tests/train/run_safety_test.cpp) use them to prove that a run killed anywhere resumes
// to the same bytes. Unset, a point costs one comparison against an empty name.
//
// Points: "step" (after an optimizer step, before anything is written), "checkpoint-files" (a
// checkpoint's files are written, its manifest not yet), "checkpoint-published", "metrics-line"
// (half of a metrics.jsonl line written), "export-component" (one component of the final model
// published, the rest not), "export-before-index" (every component published, model_index.json
// not yet).

namespace sdtrain {

// Counts one reach of the point; true when SDTRAIN_KILL_AT names it and this reach. For a
// point that must do something first (write half a line), then call kill_now().
bool kill_point_due(const char* name);

// SIGKILL, now.
[[noreturn]] void kill_now();

// Kills the process with SIGKILL when SDTRAIN_KILL_AT names this point and this reach.
inline void kill_point(const char* name) {
  if (kill_point_due(name)) kill_now();
}

}  // namespace sdtrain
