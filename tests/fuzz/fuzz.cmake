# The header fuzzer runs as one ctest entry for a bounded time (SDTRAIN_FUZZ_SECONDS) when
# clang and its libFuzzer runtime are installed (Debian: clang, libclang-rt-14-dev).
set(SDTRAIN_FUZZ_SECONDS 30 CACHE STRING "Seconds the safetensors header fuzzer runs in ctest")
find_program(SDTRAIN_CLANGXX clang++)
if(SDTRAIN_CLANGXX)
  add_test(NAME fuzz.safetensors_header
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/run_fuzzer.sh ${PROJECT_SOURCE_DIR}
                   ${PROJECT_BINARY_DIR}/fuzz ${SDTRAIN_FUZZ_SECONDS})
  set_tests_properties(fuzz.safetensors_header PROPERTIES TIMEOUT 600)
else()
  message(STATUS "sdtrain: clang++ not found; the safetensors fuzzer is not part of ctest")
endif()
