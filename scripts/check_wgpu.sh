#!/usr/bin/env bash
# The wgpu backend checked for real on a machine without a GPU: Mesa's software Vulkan driver
# (lavapipe, Debian's mesa-vulkan-drivers, installed here when missing) runs the
# transformers/PEFT parity suite (logits, LoRA gradients) and a federated DevFT run compared
# with the CPU backend (tests/backend_parity.rs). On a machine with an NVIDIA GPU the same
# tests run unchanged with `cargo test --features cuda --test fixture_parity --test backend_parity`.
set -euo pipefail
cd "$(dirname "$0")/.."

icd=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json 2>/dev/null | head -n 1 || true)
if [ -z "$icd" ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "check_wgpu: no lavapipe driver, and no root apt-get to install mesa-vulkan-drivers" >&2
    exit 1
  fi
  echo "check_wgpu: installing Debian's mesa-vulkan-drivers (lavapipe)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    mesa-vulkan-drivers libvulkan1 >/dev/null
  icd=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json | head -n 1)
fi
# Only the software driver: the run must not depend on whatever else the machine has.
export VK_ICD_FILENAMES="$icd"
# Mesa's window-system code complains on every device creation without one.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo test --profile wgpu-check --features wgpu --test fixture_parity --test backend_parity -- --nocapture
echo "check_wgpu: the wgpu parity tests passed on $(basename "$icd")"
