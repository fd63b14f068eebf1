#!/usr/bin/env bash
# Make Fashion-MNIST available to the demo without touching the network when possible:
# 1. files already in $KDX_FMNIST_ROOT or /usr/share/datasets/fashion-mnist -> nothing to do;
# 2. apt available -> install Debian's `dataset-fashion-mnist` package;
# 3. otherwise the datamodule falls back to torchvision's download at run time.
set -u
dir="${KDX_FMNIST_ROOT:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -f "$dir/train-images-idx3-ubyte" ]; then
  echo "Fashion-MNIST found in $dir"; exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo -n"
  echo "Installing Debian package dataset-fashion-mnist ..."
  if $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
     || { $sudo_cmd apt-get update -q >/dev/null 2>&1 && $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
    echo "Fashion-MNIST installed in /usr/share/datasets/fashion-mnist"; exit 0
  fi
fi
echo "Fashion-MNIST is not installed locally; kdx will try torchvision's download into ./data at run time."
exit 0
