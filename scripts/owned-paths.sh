# Shared by the project's scripts: logging and the guard on every path they create or
# delete. Source it after setting script_name, repo_root and cache_dir.

log() { printf '%s: %s\n' "${script_name}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Refuses any path that is empty, relative, contains "..", or lies outside the
# repository's cache directory: the only tree the scripts create or delete.
check_owned_path() {
    local path="$1"
    [[ -n "${path}" ]] || die "empty path"
    [[ "${path}" == /* ]] || die "relative path: ${path}"
    [[ "${path}" != *..* ]] || die "path with '..': ${path}"
    [[ -n "${repo_root}" && "${repo_root}" != "/" ]] || die "bad repository root: ${repo_root}"
    case "${path}" in
        "${cache_dir}"/*) ;;
        *) die "path outside ${cache_dir}: ${path}" ;;
    esac
}
