#!/usr/bin/env bash
# Install the third-party servers and tools the benchmark compares against, from Debian's
# packages only. Idempotent: packages already present are left alone, and the system services
# the packages enable are stopped, because bench/run.py starts its own instances on free
# loopback ports with configs in a temp dir.
set -euo pipefail

PACKAGES=(nginx varnish wrk)

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
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}"
fi

# Where an init system did start the packaged services, stop them: they are not used.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl stop nginx varnish 2>/dev/null || true
fi

for tool in nginx varnishd wrk; do
    if command -v "$tool" >/dev/null 2>&1; then
        echo "ok: $tool -> $(command -v "$tool")"
    else
        echo "missing: $tool" >&2
        exit 1
    fi
done
