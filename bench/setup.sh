#!/usr/bin/env bash
# Install the third-party servers and tools the benchmark compares against, from Debian's
# packages only. Idempotent: packages already present are left alone, and the system services
# the packages enable are stopped, because bench/run.py starts its own instances on free
# loopback ports with configs in a temp dir.
#
# The gomod scenario needs Debian's go toolchain and the module sources its GOPROXY tree is
# built from (/usr/share/gocode/src); keep GO_SOURCE_PACKAGES in step with FULL_SET in
# bench/gomodbench.py. proxy.py (a PyPI package) comes with the venv's bench extra:
#   .venv/bin/pip install -e '.[bench]'
set -euo pipefail

GO_SOURCE_PACKAGES=(
    golang-github-pkg-errors-dev
    golang-golang-x-sync-dev
    golang-github-google-uuid-dev
    golang-github-davecgh-go-spew-dev
    golang-github-pmezard-go-difflib-dev
    golang-github-spf13-pflag-dev
    golang-github-google-go-cmp-dev
    golang-github-klauspost-compress-dev
    golang-github-golang-snappy-dev
    golang-github-burntsushi-toml-dev
)
PACKAGES=(nginx varnish wrk golang-go "${GO_SOURCE_PACKAGES[@]}")

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    # Keep the package scripts from starting nginx/varnish on ports 80/6081 inside containers
    # without an init system: policy-rc.d exit 101 means "do not start services".
    policy="/usr/sbin/policy-rc.d"
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod +x "$policy"
        created_policy=1
    fi
    trap '[ "$created_policy" = 1 ] && $SUDO rm -f "$policy"' EXIT
    # Bounded: a mirror that hangs fails the setup instead of stalling it.
    timeout 900 $SUDO apt-get -o DPkg::Lock::Timeout=600 update
    DEBIAN_FRONTEND=noninteractive timeout 1800 $SUDO apt-get -o DPkg::Lock::Timeout=600 \
        install -y --no-install-recommends "${missing[@]}"
fi

# Where an init system did start the packaged services, stop them: they are not used.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl stop nginx varnish 2>/dev/null || true
fi

for tool in nginx varnishd wrk go; do
    if command -v "$tool" >/dev/null 2>&1; then
        echo "ok: $tool -> $(command -v "$tool")"
    else
        echo "missing: $tool" >&2
        exit 1
    fi
done
