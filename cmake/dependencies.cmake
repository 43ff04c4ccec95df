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

set(BLA_VENDOR OpenBLAS)
find_package(BLAS REQUIRED)
find_path(OPENBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas openblas-pthread REQUIRED)
add_library(sy_blas INTERFACE)
target_link_libraries(sy_blas INTERFACE ${BLAS_LIBRARIES})
target_include_directories(sy_blas INTERFACE ${OPENBLAS_INCLUDE_DIR})

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
