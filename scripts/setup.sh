#!/usr/bin/env bash
# Prepares a Debian 12 machine for building and testing the project.
#
# Installs the bookworm packages the build and the end-to-end tests need and
# unpacks containerd 2.1.9 and vhost-device-vsock 0.3.0 from Debian sid, runsc
# (gVisor) from bookworm-backports, and the older containerd releases the shim is
# tested on (1.7.24 from trixie, 1.6.20 from bookworm) into .cache/ of the repository,
# using a private apt configuration so nothing from sid touches the system.
# Safe to run again: every step is skipped when its result is already there.
set -euo pipefail

CONTAINERD_VERSION="2.1.9"
# containerd releases that launch a shim binary for every pod: "suite:version".
OLDER_CONTAINERDS=("trixie:1.7.24" "bookworm:1.6.20")
RUNSC_VERSION="20240729"
VHOST_VSOCK_VERSION="0.3.0"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
cache_dir="${repo_root}/.cache"
containerd_dir="${cache_dir}/containerd-${CONTAINERD_VERSION}"
runsc_dir="${cache_dir}/runsc-${RUNSC_VERSION}"
vhost_vsock_dir="${cache_dir}/vhost-device-vsock-${VHOST_VSOCK_VERSION}"

script_name=setup
# shellcheck source=scripts/owned-paths.sh
. "${script_dir}/owned-paths.sh"

[[ "$(id -u)" -eq 0 ]] || die "run as root (apt-get install needs it)"

# --- bookworm packages -------------------------------------------------------

packages=(
    runc
    protobuf-compiler
    libprotobuf-dev
    busybox-static
    containernetworking-plugins
    iproute2
    gcc
    libc6-dev
    tar
    coreutils
    clang-14
    lld-14
    wasi-libc
    libclang-rt-14-dev-wasm32
    kmod
    cpio
    xz-utils
    binutils
    qemu-system-x86
)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("${pkg}")
    fi
done

if ((${#missing[@]} > 0)); then
    log "installing: ${missing[*]}"
    # The lists are needed only when something is to be installed; refresh
    # them when they are absent or older than a day, or when an install from
    # the present lists fails (their files may have left the mirror).
    updated=0
    if [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit)" ]]; then
        apt-get update
        updated=1
    fi
    install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}")
    if ! "${install[@]}"; then
        ((updated == 0)) || die "apt-get install failed"
        apt-get update
        "${install[@]}"
    fi
else
    log "bookworm packages present"
fi

# --- containerd from sid, unpacked -------------------------------------------

# Prints the URI of the system's main Debian archive: the one serving the
# release's own suite (not -security or -updates), from either sources format.
system_mirror() {
    local codename="$1"
    local files=()
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    local f
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "${f}" ]] && files+=("${f}")
    done
    ((${#files[@]} > 0)) || return 1

    local f uri
    for f in "${files[@]}"; do
        if [[ "${f}" == *.sources ]]; then
            uri="$(awk -v suite="${codename}" '
                function flush() {
                    if (!found && deb && uris != "" && has) { split(uris, u, " "); print u[1]; found = 1 }
                    deb = 0; uris = ""; has = 0
                }
                /^[[:space:]]*$/ { flush(); next }
                /^#/ { next }
                tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
                tolower($1) == "uris:" { uris = ""; for (i = 2; i <= NF; i++) uris = uris " " $i }
                tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
                END { flush() }
            ' "${f}")"
        else
            uri="$(awk -v suite="${codename}" '
                $1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit }
                }
            ' "${f}")"
        fi
        if [[ -n "${uri}" ]]; then
            printf '%s\n' "${uri}"
            return 0
        fi
    done
    return 1
}

# Downloads package NAME whose version starts with VERSION from Debian suite
# SUITE and unpacks it into DEST, through a private apt configuration under
# .cache/apt-SUITE so the system's own apt state is never touched.
unpack_from_suite() {
    local suite="$1" name="$2" version_prefix="$3" dest="$4"
    local apt_dir="${cache_dir}/apt-${suite}"
    local codename mirror version deb

    # shellcheck disable=SC1091
    codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    [[ -n "${codename}" ]] || die "cannot read VERSION_CODENAME from /etc/os-release"
    mirror="$(system_mirror "${codename}")" || die "no Debian mirror for ${codename} in the apt sources"
    [[ "${mirror}" =~ ^(https?|file):// ]] || die "unexpected mirror URI: ${mirror}"
    log "using mirror ${mirror} for ${suite}"

    check_owned_path "${apt_dir}"
    mkdir -p "${apt_dir}/lists/partial" "${apt_dir}/cache/archives/partial" "${apt_dir}/debs"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f "${keyring}" ]] || die "missing ${keyring}"
    printf 'deb [signed-by=%s] %s %s main\n' "${keyring}" "${mirror}" "${suite}" >"${apt_dir}/sources.list"

    local apt_suite=(
        -o "Dir::Etc::SourceList=${apt_dir}/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=${apt_dir}/lists"
        -o "Dir::Cache=${apt_dir}/cache"
        -o "Dir::State::Status=/dev/null"
        -o "APT::Get::List-Cleanup=false"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
    )
    apt-get "${apt_suite[@]}" update
    version="$(apt-cache "${apt_suite[@]}" madison "${name}" |
        awk -F'|' -v v="${version_prefix}" '{ gsub(/ /, "", $2) } index($2, v) == 1 { print $2; exit }')"
    [[ -n "${version}" ]] || die "${suite} has no ${name} ${version_prefix}*"
    log "downloading ${name}=${version}"
    (cd "${apt_dir}/debs" && apt-get "${apt_suite[@]}" download "${name}=${version}")

    deb="$(find "${apt_dir}/debs" -maxdepth 1 -name "${name}_${version//:/%3a}_*.deb" -print -quit)"
    [[ -n "${deb}" ]] || die "download left no ${name} .deb"
    check_owned_path "${dest}"
    rm -rf -- "${dest}"
    mkdir -p "${dest}"
    dpkg -x "${deb}" "${dest}"
}

# Whether BINARY runs and its --version output contains TEXT. The output is taken whole
# first: grep -q leaving a pipe early would kill a writer of several lines with SIGPIPE.
reports_version() {
    local binary="$1" text="$2" output
    [[ -x "${binary}" ]] || return 1
    output="$("${binary}" --version 2>/dev/null)" || return 1
    [[ "${output}" == *"${text}"* ]]
}

containerd_ok() {
    reports_version "${containerd_dir}/usr/bin/containerd" " v${CONTAINERD_VERSION}" ||
        reports_version "${containerd_dir}/usr/bin/containerd" " ${CONTAINERD_VERSION}"
}

if containerd_ok; then
    log "containerd ${CONTAINERD_VERSION} present"
else
    unpack_from_suite sid containerd "${CONTAINERD_VERSION}" "${containerd_dir}"
    containerd_ok || die "unpacked containerd does not report ${CONTAINERD_VERSION}"
fi

# --- older containerd releases, unpacked -------------------------------------

# The shim's end-to-end tests run these; bookworm's own 1.6.20 is unpacked as well rather
# than installed, so the system keeps no containerd of its own.
for entry in "${OLDER_CONTAINERDS[@]}"; do
    suite="${entry%%:*}"
    version="${entry#*:}"
    dir="${cache_dir}/containerd-${version}"
    if reports_version "${dir}/usr/bin/containerd" " ${version}"; then
        log "containerd ${version} present"
    else
        unpack_from_suite "${suite}" containerd "${version}" "${dir}"
        reports_version "${dir}/usr/bin/containerd" " ${version}" ||
            die "unpacked containerd does not report ${version}"
    fi
done

# --- runsc (gVisor) from bookworm-backports, unpacked --------------------------

runsc_ok() {
    reports_version "${runsc_dir}/usr/bin/runsc" "${RUNSC_VERSION}"
}

if runsc_ok; then
    log "runsc ${RUNSC_VERSION} present"
else
    unpack_from_suite bookworm-backports runsc "0.0~${RUNSC_VERSION}" "${runsc_dir}"
    runsc_ok || die "unpacked runsc does not report ${RUNSC_VERSION}"
fi

# --- vhost-device-vsock from sid, unpacked ------------------------------------

# The host side of the microVMs' vsock: QEMU's vhost-user-vsock-device talks to it, and
# it maps guest connections to unix sockets (hybrid vsock). bookworm has no package.
vhost_vsock_ok() {
    reports_version "${vhost_vsock_dir}/usr/bin/vhost-device-vsock" " ${VHOST_VSOCK_VERSION}"
}

if vhost_vsock_ok; then
    log "vhost-device-vsock ${VHOST_VSOCK_VERSION} present"
else
    unpack_from_suite sid vhost-device-vsock "${VHOST_VSOCK_VERSION}" "${vhost_vsock_dir}"
    vhost_vsock_ok || die "unpacked vhost-device-vsock does not report ${VHOST_VSOCK_VERSION}"
fi

# --- summary -----------------------------------------------------------------

printf 'containerd: %s\n' "${containerd_dir}/usr/bin/containerd"
printf 'ctr:        %s\n' "${containerd_dir}/usr/bin/ctr"
for entry in "${OLDER_CONTAINERDS[@]}"; do
    printf 'containerd: %s\n' "${cache_dir}/containerd-${entry#*:}/usr/bin/containerd"
done
printf 'runc:       %s\n' "$(command -v runc)"
printf 'runsc:      %s\n' "${runsc_dir}/usr/bin/runsc"
printf 'cni:        %s\n' "/usr/lib/cni"
printf 'clang:      %s\n' "$(command -v clang-14)"
printf 'qemu:       %s\n' "$(command -v qemu-system-x86_64)"
printf 'vsock:      %s\n' "${vhost_vsock_dir}/usr/bin/vhost-device-vsock"
