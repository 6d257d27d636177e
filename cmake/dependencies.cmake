# LibTorch: any version >= 2.4, found through Torch_DIR or CMAKE_PREFIX_PATH
# (scripts/build.sh points at the pinned PyPI wheel in the tools environment).
# Torch's CMake config probes nvcc (when it was built with CUDA); give it our dialect (C++17:
# CMake 3.25 does not know nvcc 13's C++20 flag) and an
# explicit architecture list so that the probe neither needs a GPU nor picks gnu++20.
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_EXTENSIONS OFF)
if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
  string(REPLACE ";" " " _arch_list "${SDTRAIN_CUDA_ARCHITECTURES}")
  string(REGEX REPLACE "([0-9])([0-9])" "\\1.\\2" TORCH_CUDA_ARCH_LIST "${_arch_list}")
endif()
find_package(Torch REQUIRED)
if(Torch_VERSION AND Torch_VERSION VERSION_LESS 2.4)
  message(FATAL_ERROR "sdtrain needs LibTorch >= 2.4, found ${Torch_VERSION} at ${Torch_DIR}")
endif()
# Torch's CMake config fills CMAKE_CXX_FLAGS with its ABI flag; keep it, drop nothing else.
set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} ${TORCH_CXX_FLAGS}")

find_package(nlohmann_json 3.10 REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
# ICU (libicu-dev): Unicode categories, NFC and case mapping for the CLIP tokenizer.
find_package(ICU REQUIRED COMPONENTS uc)
# yaml-cpp (libyaml-cpp-dev): the .yaml sidecar (LDM config) beside a single-file checkpoint.
find_package(yaml-cpp REQUIRED)

# Debian's libstb-dev ships the headers under include/stb and a compiled libstb
# (stb_image, stb_image_write, stb_image_resize).
find_path(STB_INCLUDE_DIR stb_image.h PATH_SUFFIXES stb REQUIRED)
find_library(STB_LIBRARY stb REQUIRED)
add_library(stb::stb UNKNOWN IMPORTED)
set_target_properties(stb::stb PROPERTIES IMPORTED_LOCATION ${STB_LIBRARY}
                      INTERFACE_INCLUDE_DIRECTORIES ${STB_INCLUDE_DIR})

# PyPI's LibTorch exports its own copies of some libstdc++ symbols (std::filesystem among
# them), and executables list libtorch before libstdc++, so our std::filesystem calls bound to
# torch's copies and crashed. Putting libstdc++ first in every link reproduces the order that
# works inside Python, where libstdc++ is always loaded before torch.
add_link_options(-Wl,--push-state,--no-as-needed,-lstdc++,--pop-state)

# xxHash (libxxhash-dev), used header-only (XXH_INLINE_ALL) for checkpoint manifests.
find_path(XXHASH_INCLUDE_DIR xxhash.h REQUIRED)
