#include "sdtrain/train/device_readback.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <stdexcept>

namespace sdtrain::train {

void DeviceReadback::queue(const torch::Tensor& values) {
  if (queued()) throw std::logic_error("DeviceReadback: the previous values were not taken");
  TORCH_CHECK(values.scalar_type() == torch::kFloat32, "DeviceReadback: float32 values only");
  const torch::Device device = values.device();
  if (device.is_cpu()) {
    host_ = values.detach().clone();
    return;
  }
  host_ = torch::empty(values.sizes(),
                       torch::TensorOptions().dtype(torch::kFloat32).pinned_memory(true));
  host_.copy_(values.detach(), /*non_blocking=*/true);
  const c10::impl::DeviceGuardImplInterface* guard = c10::impl::getDeviceGuardImpl(device.type());
  copied_.emplace(device.type());
  copied_->record(guard->getStream(device));
}

std::vector<float> DeviceReadback::take() {
  if (!queued()) throw std::logic_error("DeviceReadback: nothing queued");
  if (copied_) copied_->synchronize();  // cudaEventSynchronize: this copy only, not the device
  const torch::Tensor flat = host_.reshape({-1});
  std::vector<float> values(flat.data_ptr<float>(), flat.data_ptr<float>() + flat.numel());
  host_ = torch::Tensor();
  copied_.reset();
  return values;
}

}  // namespace sdtrain::train
