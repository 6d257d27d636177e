#pragma once
// Timing shared by the bench programs: the device synchronised around the timed work only.

#include <torch/torch.h>

#include <chrono>

// Waits for the device's queued work (nothing to wait for on the CPU).
inline void synchronize(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());  // -1: the current device
}

// Mean milliseconds of `steps` calls of step() after `warmup` untimed ones.
template <typename Step>
double milliseconds_per_step(const torch::Device& device, int steps, Step&& step, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) step();
  synchronize(device);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step();
  synchronize(device);
  const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
  return elapsed.count() / steps;
}
