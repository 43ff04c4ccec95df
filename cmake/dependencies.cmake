# Every dependency of the final system is found here, once, from Debian's packages.
find_package(Threads REQUIRED)

# CAF 0.17 ships neither a CMake config nor pkg-config: imported targets by hand.
find_path(CAF_INCLUDE_DIR caf/all.hpp REQUIRED)
find_library(CAF_CORE_LIBRARY caf_core REQUIRED)
find_library(CAF_IO_LIBRARY caf_io REQUIRED)
add_library(caf::core SHARED IMPORTED)
set_target_properties(caf::core PROPERTIES IMPORTED_LOCATION "${CAF_CORE_LIBRARY}"
  INTERFACE_INCLUDE_DIRECTORIES "${CAF_INCLUDE_DIR}" INTERFACE_LINK_LIBRARIES Threads::Threads)
add_library(caf::io SHARED IMPORTED)
set_target_properties(caf::io PROPERTIES IMPORTED_LOCATION "${CAF_IO_LIBRARY}"
  INTERFACE_LINK_LIBRARIES "caf::core;Threads::Threads")

find_package(ucx 1.13 CONFIG REQUIRED)               # ucx::ucp, ucx::ucs (link both)
find_package(prometheus-cpp CONFIG REQUIRED)         # no version file ships
find_package(Boost 1.81 CONFIG REQUIRED)             # Boost::headers (Beast, Asio)
find_package(Catch2 2.13 REQUIRED)
find_package(nlohmann_json 3.11 REQUIRED)
find_package(tomlplusplus REQUIRED)
find_package(CLI11 REQUIRED)
find_package(spdlog REQUIRED)
find_package(benchmark REQUIRED)

# The tokenizer: Oniguruma (the regex engine Hugging Face `tokenizers` uses, for the same
# pre-tokenizer semantics) and utf8proc (Unicode normalization and character classes).
find_package(PkgConfig REQUIRED)
pkg_check_modules(ONIGURUMA REQUIRED IMPORTED_TARGET oniguruma)
pkg_check_modules(UTF8PROC REQUIRED IMPORTED_TARGET libutf8proc)

# OpenBLAS's OpenMP build (libopenblas-openmp-dev), found by path: the kernels parallelise with
# OpenMP around BLAS calls, and the pthread build's own spinning workers would fight them for the
# cores (measured: 3x slower on 2 cores). Debian's alternatives may point libopenblas.so.0 at the
# pthread build, so the binaries carry an RPATH to this folder.
find_library(OPENBLAS_LIBRARY openblas
  PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp NO_DEFAULT_PATH REQUIRED)
get_filename_component(OPENBLAS_LIBRARY_DIR "${OPENBLAS_LIBRARY}" DIRECTORY)
find_path(OPENBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES ${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp openblas REQUIRED)
add_library(sy_blas INTERFACE)
target_link_libraries(sy_blas INTERFACE "${OPENBLAS_LIBRARY}")
target_include_directories(sy_blas INTERFACE ${OPENBLAS_INCLUDE_DIR})
list(APPEND CMAKE_BUILD_RPATH "${OPENBLAS_LIBRARY_DIR}")
list(APPEND CMAKE_INSTALL_RPATH "${OPENBLAS_LIBRARY_DIR}")

find_package(OpenMP REQUIRED)

if(SY_WITH_CUDA)
  find_package(CUDAToolkit REQUIRED)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} REQUIRED)
  find_library(NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} REQUIRED)
  add_library(sy_nccl INTERFACE)
  target_include_directories(sy_nccl INTERFACE ${NCCL_INCLUDE_DIR})
  target_link_libraries(sy_nccl INTERFACE ${NCCL_LIBRARY})
  list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
  message(STATUS "Switchyard: CUDA ${CUDAToolkit_VERSION}, NCCL ${NCCL_LIBRARY}, archs ${CMAKE_CUDA_ARCHITECTURES}")
else()
  message(STATUS "Switchyard: CUDA code off (SWITCHYARD_CUDA=${SWITCHYARD_CUDA})")
endif()
