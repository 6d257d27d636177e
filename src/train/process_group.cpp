// The process group of a data-parallel run over LibTorch's c10d, connected the way
// torch.distributed.init_process_group("env://") connects under torchrun
// (torch/distributed/rendezvous.py, distributed_c10d.py), so sdtrain's ranks meet torchrun's
// agent store as Python ranks would. Gloo's headers are in third_party/gloo (the wheel has its
// library, not its headers).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
// NCCL's header comes from the wheel's nvidia/nccl or the CUDA toolkit (src/CMakeLists.txt).
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#define SDTRAIN_WITH_NCCL 1
#include <c10/cuda/CUDAFunctions.h>

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <string>

#include "sdtrain/train/distributed.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace sdtrain::train {

namespace {

int integer_variable(const EnvironmentLookup& environment, const char* name, int fallback,
                     int minimum, int maximum = 1 << 20) {
  const char* value = environment(name);
  if (!value || !*value) return fallback;
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  if (*end != '\0' || parsed < minimum || parsed > maximum)
    throw ConfigError(std::string(name) + "=" + value + ": expected a whole number from " +
                      std::to_string(minimum) + " to " + std::to_string(maximum) +
                      " (set by torchrun; docs/scaling.md)");
  return static_cast<int>(parsed);
}

[[noreturn]] void throw_peer_lost(const std::string& what, int rank) {
  // Said at once: torchrun's SIGTERM, sent as soon as it sees the other process fail, may end
  // this one before the error below reaches main().
  log::error(log::str("rank ", rank, ": lost another process of the run (", what, ")"));
  throw Error(ExitCode::peer_lost,
              log::str("rank ", rank,
                       ": another process of the data-parallel run stopped or went "
                       "silent. The last checkpoint in output_dir is intact: run the same command "
                       "to resume from it (any number of processes)"));
}

// Every c10d failure (gloo::IoException, c10::DistBackendError, a store timeout) as one Error.
template <typename Action>
auto translated(int rank, Action&& action) {
  try {
    return action();
  } catch (const Error&) {
    throw;
  } catch (const c10::OutOfMemoryError&) {
    throw;  // keeps its own exit code (4)
  } catch (const std::exception& e) {
    std::string what = e.what();
    if (const auto newline = what.find('\n'); newline != std::string::npos) what.resize(newline);
    throw_peer_lost(what, rank);
  }
}

class C10dProcessGroup final : public ProcessGroup {
 public:
  C10dProcessGroup(c10::intrusive_ptr<c10d::Backend> backend, std::string name)
      : backend_(std::move(backend)), name_(std::move(name)) {}

  int rank() const override { return backend_->getRank(); }
  int size() const override { return backend_->getSize(); }
  std::string backend() const override { return name_; }

  std::function<void()> all_reduce_sum_async(torch::Tensor tensor) override {
    std::vector<torch::Tensor> tensors{std::move(tensor)};
    auto work = translated(rank(), [&] { return backend_->allreduce(tensors); });
    const int rank_ = rank();
    return [work, rank_] { translated(rank_, [&] { work->wait(); }); };
  }

  void barrier() override {
    translated(rank(), [&] { backend_->barrier()->wait(); });
  }

 private:
  c10::intrusive_ptr<c10d::Backend> backend_;
  std::string name_;
};

// torchrun's agent store (as a client) or, without the agent, rank 0's own; keys under the
// prefixes Python's default group uses, plus the restart count: a restarted group must not read
// the addresses its dead predecessor left in the agent's long-lived store.
c10::intrusive_ptr<c10d::Store> connect_store(const DataParallel& parallel,
                                              std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(parallel.master_port);
  options.isServer = !parallel.agent_store && parallel.rank == 0;
  options.numWorkers = parallel.world_size;
  options.timeout = timeout;
  options.multiTenant = !parallel.agent_store;
  c10::intrusive_ptr<c10d::Store> store =
      c10::make_intrusive<c10d::TCPStore>(parallel.master_addr, options);
  store = c10::make_intrusive<c10d::PrefixStore>("default_pg", store);
  store = c10::make_intrusive<c10d::PrefixStore>("0/", store);
  return c10::make_intrusive<c10d::PrefixStore>(
      "sdtrain-attempt-" + std::to_string(parallel.restart_count) + "/", store);
}

c10::intrusive_ptr<c10d::Backend> gloo_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                               const DataParallel& parallel,
                                               std::chrono::milliseconds timeout) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  // As torch.distributed: GLOO_SOCKET_IFNAME picks the interface, else the host name's.
  const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
  options->devices.push_back(
      interface && *interface ? c10d::ProcessGroupGloo::createDeviceForInterface(interface)
                              : c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, parallel.rank, parallel.world_size,
                                                     options);
}

c10::intrusive_ptr<c10d::Backend> nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                               const DataParallel& parallel, torch::Device device,
                                               std::chrono::milliseconds timeout) {
#ifdef SDTRAIN_WITH_NCCL
  c10::cuda::set_device(device.index());
  // A failed peer must surface as an exception from wait() (exit code 8), not as the watchdog's
  // abort: torch.distributed's blocking-wait mode, unless the user chose otherwise.
  setenv("TORCH_NCCL_BLOCKING_WAIT", "1", /*overwrite=*/0);
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, parallel.rank,
                                                             parallel.world_size, options);
  // This process's GPU, not the rank-modulo-devices guess of the first collective.
  backend->setBoundDeviceId(device);
  return backend;
#else
  (void)store, (void)parallel, (void)device, (void)timeout;
  throw ConfigError(
      "this sdtrain was built without NCCL: data parallel on GPUs needs a CUDA build");
#endif
}

}  // namespace

DataParallel data_parallel_from(const EnvironmentLookup& environment) {
  DataParallel parallel;
  const char* world = environment("WORLD_SIZE");
  if (!world || !*world) return parallel;
  parallel.launched = true;
  parallel.world_size = integer_variable(environment, "WORLD_SIZE", 1, 1);
  parallel.rank = integer_variable(environment, "RANK", 0, 0);
  parallel.local_rank = integer_variable(environment, "LOCAL_RANK", 0, 0);
  parallel.local_world_size =
      integer_variable(environment, "LOCAL_WORLD_SIZE", parallel.world_size, 1);
  parallel.master_port = integer_variable(environment, "MASTER_PORT", 29500, 1, 65535);
  parallel.restart_count = integer_variable(environment, "TORCHELASTIC_RESTART_COUNT", 0, 0);
  if (const char* address = environment("MASTER_ADDR"); address && *address)
    parallel.master_addr = address;
  const char* agent = environment("TORCHELASTIC_USE_AGENT_STORE");
  parallel.agent_store = agent && std::string(agent) == "True";  // rendezvous.py's exact test
  if (parallel.rank >= parallel.world_size)
    throw ConfigError(log::str("RANK=", parallel.rank, " is not below WORLD_SIZE=",
                               parallel.world_size, " (set by torchrun; docs/scaling.md)"));
  return parallel;
}

std::shared_ptr<ProcessGroup> ProcessGroup::connect(const DataParallel& parallel,
                                                    torch::Device device,
                                                    std::chrono::milliseconds timeout) {
  try {
    const auto store = connect_store(parallel, timeout);
    if (device.is_cuda())
      return std::make_shared<C10dProcessGroup>(nccl_backend(store, parallel, device, timeout),
                                                "nccl");
    return std::make_shared<C10dProcessGroup>(gloo_backend(store, parallel, timeout), "gloo");
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string what = e.what();
    if (const auto newline = what.find('\n'); newline != std::string::npos) what.resize(newline);
    throw ConfigError(log::str("rank ", parallel.rank, ": the data-parallel processes could not ",
                               "connect through ", parallel.master_addr, ":", parallel.master_port,
                               " (", what, "); check that the port is free on the first node and ",
                               "reachable from the others, or let torchrun choose (--standalone)"));
  }
}

}  // namespace sdtrain::train
