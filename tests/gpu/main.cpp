// GPU tests: run on a machine with a CUDA device; elsewhere the binary exits 77, which ctest reports
// as skipped (never as passed).
#define CATCH_CONFIG_RUNNER
#include "model/cuda/gpu_moe.hpp"

#include <catch2/catch.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  std::string why;
  if (!sy::model::cuda::device_available(&why)) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", why.c_str());
    return 77;
  }
  std::printf("device 0: %s\n", sy::model::cuda::device_description(0).c_str());
  return Catch::Session().run(argc, argv);
}
