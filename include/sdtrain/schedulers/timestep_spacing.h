#pragma once
// The arithmetic every sampler shares to place its timesteps and sigmas. diffusers builds these
// with numpy in float64 from float32 tables, rounding half to even; matching it bit for bit
// means reproducing numpy's linspace/arange/interp/round rather than torch's equivalents
// (torch.linspace, for one, fills from both ends and differs in the last bits).

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace sdtrain::schedulers {

// numpy.linspace(start, stop, num) (endpoint included): start + k * ((stop - start) / (num - 1)),
// the last value exactly stop; [start] for num == 1.
std::vector<double> numpy_linspace(double start, double stop, int64_t num);
// numpy.arange(start, stop, step) for floats: ceil((stop - start) / step) values, the i-th
// being start + i * ((start + step) - start) as numpy's fill computes them.
std::vector<double> numpy_arange(double start, double stop, double step);
// numpy.round: to nearest, ties to even.
double round_half_even(double value);

// The training sigmas sqrt((1 - ac) / ac), float32 [T], computed in float32 as diffusers does.
torch::Tensor sigma_table(const torch::Tensor& alphas_cumprod);
// numpy.interp(x, arange(T), table): piecewise linear in float64 over the float32 table.
std::vector<double> interpolate_sigmas(const std::vector<double>& timesteps, const torch::Tensor& table);
// Karras et al. (2022) rho = 7 spacing between sigma_max and sigma_min in float64
// (diffusers' _convert_to_karras).
std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t num);
// The fractional training timestep whose log-sigma, interpolated linearly in the table,
// equals log(sigma) (diffusers' _sigma_to_t, including its float32 intermediate steps).
double sigma_to_t(double sigma, const torch::Tensor& table);

// float64 values -> float32 [n] / int64 [n] CPU tensors.
torch::Tensor to_float_tensor(const std::vector<double>& values);
torch::Tensor to_long_tensor(const std::vector<int64_t>& values);

}  // namespace sdtrain::schedulers
