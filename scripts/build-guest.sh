#!/usr/bin/env bash
# Builds the microVM guest image: an uncompressed kernel and an initramfs.
#
# Usage: build-guest.sh [INIT]   (or GUEST_INIT=INIT build-guest.sh)
#
# Downloads Debian bookworm's current amd64 kernel package (the versioned package that
# linux-image-amd64 depends on) and unpacks it under .cache/guest/ without installing it.
# From it come
#   .cache/guest/vmlinux                the uncompressed kernel, which QEMU's microvm
#                                       machine type boots directly;
#   .cache/guest/NAME.cpio[.gz]         a newc archive holding INIT as /init, a static
#                                       busybox as /bin/busybox and the few kernel modules
#                                       the guest needs, with their load order in
#                                       /lib/modules/load-order.
# INIT is the guest agent (a static binary, vmm-task): the image then also holds runc and
# the shared libraries it loads, since the agent runs containers with it. INIT may also
# be a shell script such as scripts/guest-test-init.sh, which only reports readiness.
# NAME is GUEST_IMAGE_NAME, "initramfs" by default.
#
# GUEST_INITRAMFS_COMPRESSION=none|gzip chooses the archive format (default none: under
# software emulation a gzip archive, 1.4 MB instead of 3.4 MB, booted no faster, since
# inflating it costs what reading fewer bytes saves). Runs as root; every step is skipped
# when its result is already up to date, and nothing outside the repository's .cache/ is
# written or deleted.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
cache_dir="${repo_root}/.cache"
guest_dir="${cache_dir}/guest"

# The modules the guest loads, by name: the virtio-mmio transport (microvm has no PCI),
# the virtio-serial console port, vsock over virtio, 9p over virtio and virtio-net.
# Their dependencies are added and ordered below.
GUEST_MODULES=(
    virtio_mmio
    virtio_console
    vmw_vsock_virtio_transport
    9p
    9pnet_virtio
    virtio_net
)

script_name=build-guest
# shellcheck source=scripts/owned-paths.sh
. "${script_dir}/owned-paths.sh"

# rm -rf and mkdir -p, each on checked paths only.
remove_owned() {
    local path
    for path in "$@"; do
        check_owned_path "${path}"
        rm -rf -- "${path}"
    done
}
make_owned_dir() {
    local path
    for path in "$@"; do
        check_owned_path "${path}"
        mkdir -p -- "${path}"
    done
}

[[ "$(id -u)" -eq 0 ]] || die "run as root (the image's files must belong to root)"

init_src="${1:-${GUEST_INIT:-}}"
[[ -n "${init_src}" ]] || die "name the guest's init (the vmm-task agent binary, or a test script)"
[[ -f "${init_src}" ]] || die "no init at ${init_src}"
init_src="$(cd "$(dirname "${init_src}")" && pwd)/$(basename "${init_src}")"

image_name="${GUEST_IMAGE_NAME:-initramfs}"
[[ "${image_name}" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "GUEST_IMAGE_NAME must be a plain file name, not ${image_name}"

compression="${GUEST_INITRAMFS_COMPRESSION:-none}"
case "${compression}" in
    none) initramfs="${guest_dir}/${image_name}.cpio" stale_initramfs="${guest_dir}/${image_name}.cpio.gz" ;;
    gzip) initramfs="${guest_dir}/${image_name}.cpio.gz" stale_initramfs="${guest_dir}/${image_name}.cpio" ;;
    *) die "GUEST_INITRAMFS_COMPRESSION must be none or gzip, not ${compression}" ;;
esac

busybox=/bin/busybox
[[ -x "${busybox}" ]] || die "no ${busybox}: install busybox-static"
file_is_static() { ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'INTERP'; }
file_is_static "${busybox}" || die "${busybox} is not statically linked: install busybox-static"

# An ELF init is the agent: it must run without a loader, and it needs runc.
runc_files=()
if [[ "$(od -An -t x1 -N 4 "${init_src}" | tr -d ' \n')" == "7f454c46" ]]; then
    file_is_static "${init_src}" || die "${init_src} is not statically linked"
    runc="$(command -v runc || true)"
    [[ -n "${runc}" ]] || die "no runc on PATH: the agent runs containers with it (install runc)"
    runc="$(readlink -f "${runc}")"
    runc_files+=("${runc}")
    # The loader and the libraries, by the paths the loader looks them up by.
    while read -r lib; do
        runc_files+=("${lib}")
    done < <(ldd "${runc}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
fi

for tool in apt-get apt-cache dpkg-deb modinfo cpio readelf od xz gzip sha256sum; do
    command -v "${tool}" >/dev/null || die "missing ${tool}"
done

make_owned_dir "${guest_dir}"

# --- the kernel package ---------------------------------------------------------

# Prints "NAME=VERSION" of the versioned kernel package that the candidate version of
# linux-image-amd64 depends on, e.g. linux-image-6.1.0-57-amd64=6.1.192-3.
kernel_package() {
    local candidate
    candidate="$(apt-cache policy linux-image-amd64 | awk '$1 == "Candidate:" { print $2; exit }')"
    [[ -n "${candidate}" && "${candidate}" != "(none)" ]] || return 1
    apt-cache show "linux-image-amd64=${candidate}" |
        awk -F': ' '$1 == "Depends" { print $2; exit }' | tr ',' '\n' |
        sed -n 's/^ *\(linux-image-[0-9][^ ]*\) (= \([^)]*\)).*/\1=\2/p' | head -n1 | grep .
}

if ! kernel_id="$(kernel_package)"; then
    log "apt knows no linux-image-amd64; refreshing the package lists"
    apt-get update
    kernel_id="$(kernel_package)" || die "no versioned kernel package behind linux-image-amd64"
fi
kernel_pkg="${kernel_id%%=*}"
kernel_version="${kernel_id#*=}"

debs_dir="${guest_dir}/debs"
kernel_dir="${guest_dir}/kernel"
kernel_stamp="${kernel_dir}/.unpacked-from"

if [[ -f "${kernel_stamp}" && "$(<"${kernel_stamp}")" == "${kernel_id}" ]]; then
    log "${kernel_id} already unpacked"
else
    make_owned_dir "${debs_dir}"
    deb="$(find "${debs_dir}" -maxdepth 1 -name "${kernel_pkg}_${kernel_version//:/%3a}_*.deb" -print -quit)"
    if [[ -z "${deb}" ]]; then
        log "downloading ${kernel_id}"
        # A download from lists older than the mirror's files fails; refresh once then.
        # The download runs as root: apt's own user may not write to the cache.
        download=(apt-get -o APT::Sandbox::User=root download "${kernel_id}")
        if ! (cd "${debs_dir}" && "${download[@]}"); then
            apt-get update
            (cd "${debs_dir}" && "${download[@]}")
        fi
        deb="$(find "${debs_dir}" -maxdepth 1 -name "${kernel_pkg}_${kernel_version//:/%3a}_*.deb" -print -quit)"
        [[ -n "${deb}" ]] || die "download left no ${kernel_pkg} .deb in ${debs_dir}"
    fi
    log "unpacking ${deb##*/}"
    remove_owned "${kernel_dir}"
    make_owned_dir "${kernel_dir}"
    dpkg-deb -x "${deb}" "${kernel_dir}"
    printf '%s' "${kernel_id}" >"${kernel_dir}/.unpacked-from"
    # The older packages' files are of no further use.
    find "${debs_dir}" -maxdepth 1 -name 'linux-image-*.deb' ! -name "${deb##*/}" -print0 |
        while IFS= read -r -d '' old; do remove_owned "${old}"; done
fi

vmlinuz="$(find "${kernel_dir}/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)"
[[ -n "${vmlinuz}" ]] || die "${kernel_pkg} holds no /boot/vmlinuz-*"
kernel_release="${vmlinuz##*/vmlinuz-}"
modules_dir="${kernel_dir}/lib/modules/${kernel_release}"
[[ -d "${modules_dir}" ]] || die "${kernel_pkg} holds no /lib/modules/${kernel_release}"

# --- vmlinux ----------------------------------------------------------------------

# Reads an unsigned little-endian integer of SIZE bytes at OFFSET of FILE.
read_le() {
    local file="$1" offset="$2" size="$3"
    od -An -t "u${size}" -j "${offset}" -N "${size}" --endian=little "${file}" | tr -d ' '
}

# Writes the kernel ELF image held in bzImage IN to OUT. The x86 boot protocol
# (2.08 and later) records where the compressed payload starts and how long it is:
# payload_offset (0x248) counts from the protected-mode code, which follows the
# (setup_sects + 1) sectors of real-mode setup. The payload's first bytes tell its
# compression. Every format but gzip carries the uncompressed size as 4 more bytes
# after the compressed stream: they are cut off and checked against the result.
extract_vmlinux() {
    local in="$1" out="$2"
    local magic version setup_sects payload_offset payload_length start head

    magic="$(dd if="${in}" bs=1 skip=$((0x202)) count=4 status=none)"
    [[ "${magic}" == "HdrS" ]] || die "${in} is not a bzImage (no HdrS header)"
    version="$(read_le "${in}" $((0x206)) 2)"
    ((version >= 0x0208)) || die "${in}: boot protocol $(printf '%#x' "${version}") has no payload fields"

    setup_sects="$(read_le "${in}" $((0x1f1)) 1)"
    ((setup_sects > 0)) || setup_sects=4
    payload_offset="$(read_le "${in}" $((0x248)) 4)"
    payload_length="$(read_le "${in}" $((0x24c)) 4)"
    start=$(((setup_sects + 1) * 512 + payload_offset))
    ((payload_length > 4)) || die "${in}: empty payload"

    head="$(od -An -t x1 -j "${start}" -N 6 "${in}" | tr -d ' \n')"
    local decompress stream_length=$((payload_length - 4)) size_trailer=1
    case "${head}" in
        1f8b*) decompress=(gzip -dc) stream_length=${payload_length} size_trailer=0 ;;
        fd377a585a00) decompress=(xz -dc) ;;
        28b52ffd*) decompress=(zstd -qdc) ;;
        5d0000*) decompress=(xz --format=lzma -dc) ;;
        425a68*) decompress=(bzip2 -dc) ;;
        02214c18*) decompress=(lz4 -dc) ;;
        894c5a4f*) decompress=(lzop -dc) ;;
        *) die "${in}: unknown compression of the payload (first bytes ${head})" ;;
    esac
    command -v "${decompress[0]}" >/dev/null || die "missing ${decompress[0]} to unpack ${in}"
    log "extracting vmlinux (${decompress[0]}, ${payload_length} bytes at offset ${start})"

    dd if="${in}" iflag=skip_bytes,count_bytes skip="${start}" count="${stream_length}" bs=1M status=none |
        "${decompress[@]}" >"${out}"
    if ((size_trailer)); then
        local expected actual
        expected="$(read_le "${in}" $((start + stream_length)) 4)"
        actual="$(stat -c %s "${out}")"
        ((expected == actual)) || die "${in}: payload unpacked to ${actual} bytes, not ${expected}"
    fi
    [[ "$(od -An -t x1 -N 4 "${out}" | tr -d ' \n')" == "7f454c46" ]] ||
        die "the payload of ${in} is not an ELF kernel"
}

vmlinux="${guest_dir}/vmlinux"
vmlinux_stamp="${guest_dir}/.vmlinux-from"
check_owned_path "${vmlinux}"
if [[ -s "${vmlinux}" && -f "${vmlinux_stamp}" && "$(<"${vmlinux_stamp}")" == "${kernel_id}" ]]; then
    log "vmlinux up to date"
else
    check_owned_path "${vmlinux}.tmp"
    extract_vmlinux "${vmlinuz}" "${vmlinux}.tmp"
    mv -f -- "${vmlinux}.tmp" "${vmlinux}"
    check_owned_path "${vmlinux_stamp}"
    printf '%s' "${kernel_id}" >"${vmlinux_stamp}"
fi

# --- initramfs --------------------------------------------------------------------

# Everything the archive is made of, so an unchanged set of inputs skips the build.
inputs_key="$(
    {
        printf 'kernel %s\ncompression %s\n' "${kernel_id}" "${compression}"
        printf 'module %s\n' "${GUEST_MODULES[@]}"
        sha256sum "${init_src}" "${busybox}" "${BASH_SOURCE[0]}" "${runc_files[@]}" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)"
initramfs_stamp="${guest_dir}/.${image_name}-inputs"
check_owned_path "${initramfs}"
check_owned_path "${initramfs_stamp}"

if [[ -s "${initramfs}" && -f "${initramfs_stamp}" && "$(<"${initramfs_stamp}")" == "${inputs_key}" ]]; then
    log "initramfs up to date"
    printf 'vmlinux:   %s\n' "${vmlinux}"
    printf 'initramfs: %s\n' "${initramfs}"
    exit 0
fi

# --- modules ----------------------------------------------------------------------

# Module names use "_" where file names may use "-".
declare -A module_file=()
while IFS= read -r -d '' ko; do
    name="${ko##*/}"
    name="${name%%.ko*}"
    module_file["${name//-/_}"]="${ko}"
done < <(find "${modules_dir}/kernel" -name '*.ko*' -print0)

declare -A builtin=()
if [[ -f "${modules_dir}/modules.builtin" ]]; then
    while IFS= read -r line; do
        name="${line##*/}"
        name="${name%.ko}"
        builtin["${name//-/_}"]=1
    done <"${modules_dir}/modules.builtin"
fi

# Appends NAME to load_order after its dependencies (from each module's own
# "depends=" field: the package ships no modules.dep). Built-in modules are skipped.
declare -A visiting=() placed=()
load_order=()
add_module() {
    local name="${1//-/_}"
    [[ -z "${placed[${name}]:-}" ]] || return 0
    if [[ -n "${builtin[${name}]:-}" ]]; then
        placed["${name}"]=1
        return 0
    fi
    [[ -z "${visiting[${name}]:-}" ]] || die "module dependency cycle through ${name}"
    local file="${module_file[${name}]:-}"
    [[ -n "${file}" ]] || die "kernel ${kernel_release} has no module ${name}"

    visiting["${name}"]=1
    local deps dep
    deps="$(modinfo -F depends "${file}")"
    for dep in ${deps//,/ }; do
        add_module "${dep}"
    done
    unset 'visiting[${name}]'
    placed["${name}"]=1
    load_order+=("${name}")
}
for name in "${GUEST_MODULES[@]}"; do
    add_module "${name}"
done

# --- the archive ------------------------------------------------------------------

root="${guest_dir}/initramfs-root"
remove_owned "${root}"
make_owned_dir "${root}"/{bin,dev,proc,sys,run,tmp,lib/modules}

install -m 0755 "${init_src}" "${root}/init"
install -m 0755 "${busybox}" "${root}/bin/busybox"
ln -s busybox "${root}/bin/sh"
for file in "${runc_files[@]}"; do
    dest="${root}${file}"
    [[ "${file}" == /usr/sbin/runc || "${file}" == */runc ]] && dest="${root}/usr/sbin/runc"
    check_owned_path "${dest}"
    mkdir -p -- "$(dirname "${dest}")"
    cp -L -- "${file}" "${dest}"
done
# The kernel opens /dev/console for init's standard streams before anything is
# mounted, so the node has to be in the archive.
check_owned_path "${root}/dev/console"
mknod -m 0600 "${root}/dev/console" c 5 1

# Modules go in flat, uncompressed (insmod in the guest needs no decompressor),
# and load-order names them in the order they can be loaded.
: >"${root}/lib/modules/load-order"
for name in "${load_order[@]}"; do
    src="${module_file[${name}]}"
    dst="${root}/lib/modules/${name}.ko"
    case "${src}" in
        *.ko) cp -- "${src}" "${dst}" ;;
        *.ko.xz) xz -dc -- "${src}" >"${dst}" ;;
        *.ko.zst) zstd -qdc -- "${src}" >"${dst}" ;;
        *.ko.gz) gzip -dc -- "${src}" >"${dst}" ;;
        *) die "unknown module format: ${src}" ;;
    esac
    printf '%s.ko\n' "${name}" >>"${root}/lib/modules/load-order"
done
printf '%s\n' "${kernel_release}" >"${root}/lib/modules/kernel-release"

# A fixed order and fixed times make the archive the same for the same inputs.
check_owned_path "${initramfs}.tmp"
(
    cd "${root}"
    find . -mindepth 1 -exec touch -h -d @0 {} +
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible
) | if [[ "${compression}" == gzip ]]; then gzip -9n; else cat; fi >"${initramfs}.tmp"
mv -f -- "${initramfs}.tmp" "${initramfs}"
remove_owned "${root}" "${stale_initramfs}"
printf '%s' "${inputs_key}" >"${initramfs_stamp}"
log "initramfs holds modules: ${load_order[*]}"

printf 'vmlinux:   %s\n' "${vmlinux}"
printf 'initramfs: %s\n' "${initramfs}"
