#!/usr/bin/env bash
# Switchyard's one entry point on Debian 12: installs what the build needs, builds, and runs.
#
#   deploy/setup.sh run     install, build, run the main job: the embedded cluster serving HTTP
#   deploy/setup.sh test    install, build, run the test suite (ctest's summary line comes last)
#   deploy/setup.sh build   install and build only
#   deploy/setup.sh deps    install the Debian packages only
#
# Idempotent: packages already present are not reinstalled; `apt-get update` runs once, and only
# when something is missing. Environment: BUILD_DIR (default build), SWITCHYARD_CUDA (AUTO|ON|OFF).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libcaf-dev libucx-dev ucx-utils prometheus-cpp-dev libboost1.81-dev catch2 libopenblas-openmp-dev
  nlohmann-json3-dev libtomlplusplus-dev libcli11-dev libspdlog-dev libbenchmark-dev
  libonig-dev libutf8proc-dev
  python3 python3-numpy python3-yaml iproute2 curl
  prometheus chromium
)

log() { printf '[setup] %s\n' "$*" >&2; }

install_deps() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then missing+=("$p"); fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "all ${#PACKAGES[@]} Debian packages present"
    return
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
}

build() {
  local jobs
  jobs="$(nproc)"
  log "configuring $BUILD_DIR (Release, SWITCHYARD_CUDA=${SWITCHYARD_CUDA:-AUTO})"
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DSWITCHYARD_CUDA="${SWITCHYARD_CUDA:-AUTO}" >"$BUILD_DIR.configure.log" 2>&1 ||
    { cat "$BUILD_DIR.configure.log"; exit 1; }
  log "building with $jobs jobs"
  cmake --build "$BUILD_DIR" -j "$jobs"
}

run_main() {
  # The embedded cluster (coordinator, router, 4 expert hosts) on a demo Mixtral-shaped model made
  # once into ~/.cache/switchyard; extra arguments go to `switchyard serve` (e.g. --model DIR).
  log "starting switchyard serve (Ctrl-C stops it)"
  exec "$BUILD_DIR/apps/switchyard" serve --http "${SWITCHYARD_HTTP:-127.0.0.1:8080}" "$@"
}

run_tests() {
  cd "$BUILD_DIR"
  # ctest prints its summary ("N% tests passed, N tests failed out of N") before the label times and
  # the list of skipped tests (the GPU tests on a machine without one); repeat it as the last line.
  set +e
  ctest --output-on-failure -j "$(nproc)" --timeout 900 2>&1 | tee "$BUILD_DIR/ctest.log"
  local rc=${PIPESTATUS[0]}
  set -e
  local summary
  summary="$(grep -E '^[0-9]+% tests passed' "$BUILD_DIR/ctest.log" | tail -n 1)"
  [ -n "$summary" ] && printf '\n%s\n' "$summary"
  return "$rc"
}

cmd="${1:-run}"
[ $# -gt 0 ] || set -- run
case "$cmd" in
  deps) install_deps ;;
  build) install_deps; build ;;
  run) shift; install_deps; build; run_main "$@" ;;
  test) install_deps; build; run_tests ;;
  *) echo "usage: $0 [run|test|build|deps]" >&2; exit 2 ;;
esac
