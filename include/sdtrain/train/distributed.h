#pragma once
// Data-parallel training launched by torchrun (docs/scaling.md): `torchrun --no-python
// --nproc-per-node N sdtrain --config ...` starts N processes that each hold the whole model,
// train on their share of every global batch and all-reduce gradients through LibTorch's c10d
// (NCCL between GPUs, Gloo on the CPU). What torchrun tells each process is read here; the
// process group hides c10d behind a small interface (src/train/process_group.cpp).

#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "sdtrain/util/environment.h"

namespace sdtrain::train {

// This process's place in a data-parallel run, from torchrun's variables.
struct DataParallel {
  bool launched = false;  // WORLD_SIZE is set: a launcher started this process
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;  // the GPU this process trains on: cuda:LOCAL_RANK
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent hosts the TCPStore and every rank,
  // rank 0 included, connects to it as a client (torch/distributed/rendezvous.py).
  bool agent_store = false;
  int restart_count = 0;  // TORCHELASTIC_RESTART_COUNT: keys of a restarted group are its own
  bool is_main() const { return rank == 0; }
};

// RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
// TORCHELASTIC_USE_AGENT_STORE and TORCHELASTIC_RESTART_COUNT; `launched` false (one process)
// when WORLD_SIZE is unset. ConfigError naming the variable when one is malformed or RANK is not
// below WORLD_SIZE.
DataParallel data_parallel_from(const EnvironmentLookup& environment);

// The processes of a run, connected. Collectives throw Error(ExitCode::peer_lost) when another
// process has gone (killed, crashed, or silent past the timeout).
class ProcessGroup {
 public:
  // Connects to the run's TCPStore and forms the group: NCCL on a CUDA device, Gloo on the CPU.
  static std::shared_ptr<ProcessGroup> connect(const DataParallel& parallel, torch::Device device,
                                               std::chrono::milliseconds timeout);
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  // Starts summing `tensor` in place over every process; the returned function waits for it.
  virtual std::function<void()> all_reduce_sum_async(torch::Tensor tensor) = 0;
  void all_reduce_sum(torch::Tensor tensor) { all_reduce_sum_async(std::move(tensor))(); }
  virtual void barrier() = 0;
};

}  // namespace sdtrain::train
