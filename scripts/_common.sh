# Shell functions shared by scripts/up, scripts/down and scripts/test: where the repo and
# its virtualenv are, installing what a fresh Debian 12 machine lacks, and watching the
# processes of a local cluster through their pid files. Sourced, never run.

STRIPEFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STRIPEFS_VENV="$STRIPEFS_ROOT/.venv"
# Written after a successful `pip install`; a pyproject.toml newer than it means the
# dependencies may have changed, so the project is installed again.
STRIPEFS_STAMP="$STRIPEFS_VENV/.stripefs-installed"
# Debian packages the project needs at run time (fuse3), to build pyfuse3 (libfuse3-dev,
# pkg-config, patch) and in its end-to-end tests (rsync, attr, acl).
STRIPEFS_APT_PACKAGES=(fuse3 libfuse3-dev pkg-config patch rsync attr acl)
# The pyfuse3 release the mount is built on, its source's sha256, and the version of the
# stripefs additions patched into it (scripts/pyfuse3-stripefs.patch: lock requests,
# fallocate, the lock owner at flush). Bump ADDITIONS with the patch (and with
# STRIPEFS_ADDITIONS in it) so that existing virtualenvs rebuild it.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_ADDITIONS=2

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Absolute form of a path given relative to the current directory, without touching
# the path itself (a dead FUSE mount cannot be stat'ed).
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

_dpkg_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" || return 1
    [[ "$status" == "install ok installed" ]]
}

# Installs the missing Debian packages; runs `apt-get update` only when something is missing.
ensure_system_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        log "note: not a Debian system; make sure these are installed: ${STRIPEFS_APT_PACKAGES[*]} gcc python3-venv"
        return 0
    fi
    local missing=() pkg
    for pkg in "${STRIPEFS_APT_PACKAGES[@]}"; do
        _dpkg_installed "$pkg" || missing+=("$pkg")
    done
    # pyfuse3 ships no wheels: it is compiled, against Python's headers.
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    if ! command -v python3 >/dev/null 2>&1; then
        missing+=(python3 python3-venv python3-dev)
    else
        python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
        python3 -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
            || missing+=(python3-dev)
    fi
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "missing packages ${missing[*]}, and not root to install them"
        sudo=(sudo)
    fi
    log "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Creates .venv and installs the project with its test extras, only when the venv is
# missing or pyproject.toml changed since the last install.
ensure_venv() {
    if [[ ! -x "$STRIPEFS_VENV/bin/python" ]]; then
        log "creating virtualenv $STRIPEFS_VENV"
        python3 -m venv "$STRIPEFS_VENV"
    fi
    # First, so that installing the project finds its pyfuse3 there and builds no other.
    ensure_pyfuse3
    if [[ ! -f "$STRIPEFS_STAMP" || "$STRIPEFS_ROOT/pyproject.toml" -nt "$STRIPEFS_STAMP" ]]; then
        log "installing stripefs and its dependencies into $STRIPEFS_VENV"
        "$STRIPEFS_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$STRIPEFS_ROOT[test]"
        touch "$STRIPEFS_STAMP"
    fi
}

# Builds pyfuse3 from its release's source with the stripefs additions and installs it
# into the virtualenv, unless the installed one already has this version of them.
ensure_pyfuse3() {
    local py="$STRIPEFS_VENV/bin/python"
    if "$py" -c "import sys, pyfuse3; sys.exit(getattr(pyfuse3, 'STRIPEFS_ADDITIONS', 0) != $PYFUSE3_ADDITIONS)" \
        >/dev/null 2>&1; then
        return 0
    fi
    log "building pyfuse3 $PYFUSE3_VERSION with the stripefs additions ($PYFUSE3_ADDITIONS)"
    local work sdist
    work="$(mktemp -d)"
    sdist="$work/pyfuse3-$PYFUSE3_VERSION.tar.gz"
    "$py" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
        -d "$work" "pyfuse3==$PYFUSE3_VERSION" || { rm -rf "$work"; die "could not download pyfuse3 $PYFUSE3_VERSION"; }
    if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --quiet - >/dev/null; then
        rm -rf "$work"
        die "pyfuse3 $PYFUSE3_VERSION: the downloaded source does not match its sha256"
    fi
    tar -xzf "$sdist" -C "$work"
    patch -d "$work/pyfuse3-$PYFUSE3_VERSION" -p1 --quiet <"$STRIPEFS_ROOT/scripts/pyfuse3-stripefs.patch" \
        || { rm -rf "$work"; die "scripts/pyfuse3-stripefs.patch does not apply to pyfuse3 $PYFUSE3_VERSION"; }
    SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3_VERSION+stripefs.$PYFUSE3_ADDITIONS" \
        "$py" -m pip install -q --disable-pip-version-check --no-deps "$work/pyfuse3-$PYFUSE3_VERSION" \
        || { rm -rf "$work"; die "building pyfuse3 failed"; }
    rm -rf "$work"
}

ensure_installed() {
    if [[ "${STRIPEFS_SKIP_INSTALL:-}" == 1 ]]; then
        return 0
    fi
    ensure_system_packages
    ensure_venv
}

# True when pid is a live (not zombie) process whose command line mentions stripefs, so a
# stale pid file whose number was reused by another program is not mistaken for ours.
pid_alive() {
    local pid="$1" state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/stat" ]] || return 1
    # The state letter follows the parenthesised command name, which may contain spaces.
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != Z && "$state" != X ]] || return 1
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *stripefs* || "$cmdline" == *fs.cli* ]]
}

# The pid recorded in a pid file when that process is still alive, else nothing.
pidfile_alive() {
    local file="$1" pid
    [[ -f "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    pid_alive "$pid" && printf '%s\n' "$pid"
}

# True when `dir` (absolute) is a mount point according to the kernel's table; reading
# the table instead of stat'ing works on a mount whose FUSE process has died.
is_mounted() {
    local dir="${1%/}" escaped
    escaped="${dir// /\\040}"
    awk -v m="$escaped" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# Sends SIGTERM to each pid, waits up to `grace` seconds for all of them to exit, then
# SIGKILLs what is left.
terminate_pids() {
    local grace="$1"
    shift
    local pids=("$@") pid deadline left
    ((${#pids[@]} > 0)) || return 0
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + grace))
    while :; do
        left=()
        for pid in "${pids[@]}"; do
            pid_alive "$pid" && left+=("$pid")
        done
        ((${#left[@]} > 0)) || return 0
        if ((SECONDS >= deadline)); then
            log "still running after ${grace}s, killing: ${left[*]}"
            kill -KILL "${left[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
}

# Prints the last lines of a log file, for error messages.
log_tail() {
    local file="$1"
    if [[ -s "$file" ]]; then
        log "---- last lines of $file ----"
        tail -n 30 "$file" >&2
        log "----"
    else
        log "($file is empty or missing)"
    fi
}
