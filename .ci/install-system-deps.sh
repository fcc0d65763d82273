#!/usr/bin/env bash
# Install the system tools the deploy tests (tests/test_deploy.py) need:
#   promtool, prometheus (Debian package `prometheus`)
#   amtool, alertmanager (Debian package `prometheus-alertmanager`)
#   docker-compose       (Debian package `docker-compose`: only its `config` command is used,
#                         to validate docker-compose.yml; no container engine is needed)
#   kubectl              (for `kubectl kustomize`; Debian package `kubernetes-client` when
#                         no kubectl is on PATH: any kubectl from 1.20 on builds our overlays)
#
# Idempotent: does nothing but print versions when all of them are already on PATH.
# Debian/Ubuntu only (apt). Runs as root, or through sudo when available.
# The packages ship systemd units and init.d scripts and try to start the daemons on
# install; that is blocked here (a temporary policy-rc.d), so the install works in
# containers without systemd and never leaves daemons running on :9090/:9093 on a CI host
# (the tests start their own instances on free loopback ports).
set -euo pipefail

TOOLS=(promtool amtool prometheus alertmanager docker-compose kubectl)

have_all() {
    local t
    for t in "${TOOLS[@]}"; do
        command -v "$t" >/dev/null 2>&1 || return 1
    done
}

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    SUDO=()
fi

# Debian installs the Alertmanager binary as `prometheus-alertmanager`; expose it as
# `alertmanager` too (upstream name) so scripts and tests can use either.
link_alertmanager() {
    if ! command -v alertmanager >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1; then
        "${SUDO[@]}" ln -sf "$(command -v prometheus-alertmanager)" /usr/local/bin/alertmanager
    fi
}

print_versions() {
    local t
    for t in "${TOOLS[@]}"; do
        if [[ $t == kubectl ]]; then
            printf '%-13s %-32s %s\n' "$t" "$(command -v "$t")" "$("$t" version --client 2>&1 | head -n1)"
            continue
        fi
        printf '%-13s %-32s %s\n' "$t" "$(command -v "$t")" "$("$t" --version 2>&1 | head -n1)"
    done
}

link_alertmanager
if have_all; then
    echo "install-system-deps: already installed, nothing to do"
    print_versions
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: apt-get not found; install promtool, amtool, prometheus and alertmanager" \
         "(Prometheus 2.x and Alertmanager 0.2x release binaries), docker-compose and kubectl" \
         "by hand and put them on PATH" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
    echo "install-system-deps: must run as root (or with sudo available)" >&2
    exit 1
fi

# Keep the packages' maintainer scripts from starting the daemons (invoke-rc.d and
# deb-systemd-invoke both obey policy-rc.d; exit 101 = action forbidden). Only install
# our own policy file when none exists, and remove exactly that file afterwards.
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
cleanup() {
    if [[ $OWN_POLICY -eq 1 ]]; then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\n# temporary, from .ci/install-system-deps.sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 0755 "$POLICY"
    OWN_POLICY=1
fi

PACKAGES=(prometheus prometheus-alertmanager docker-compose)
# Only when missing: another kubectl (e.g. a newer one from Google's repository) also owns
# /usr/bin/kubectl, and any of them will do.
command -v kubectl >/dev/null 2>&1 || PACKAGES+=(kubernetes-client)

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${PACKAGES[@]}"

link_alertmanager
if ! have_all; then
    echo "install-system-deps: still missing after install:" >&2
    for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || echo "  $t" >&2; done
    exit 1
fi
print_versions
