# shellcheck shell=bash
# Shell functions shared by scripts/up, scripts/down and scripts/test: where the repo and
# its virtualenv are, installing what a fresh Debian 12 machine lacks, a private PostgreSQL
# for the metadata (also run by the tests, tests/pg.py), and watching the processes of a
# local cluster through their pid files. Sourced, never run.

STRIPEFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STRIPEFS_VENV="$STRIPEFS_ROOT/.venv"
# Written after a successful `pip install`; a pyproject.toml newer than it means the
# dependencies may have changed, and a newer setup.py or C source that the compiled part
# must be built again: the project is installed again.
STRIPEFS_STAMP="$STRIPEFS_VENV/.stripefs-installed"
# Debian packages the project needs at run time (fuse3), to build pyfuse3 (libfuse3-dev,
# pkg-config, patch) and its own leaf hasher (libssl-dev: proto/_leafhash.c, setup.py),
# and in its end-to-end tests (rsync, attr, acl).
STRIPEFS_APT_PACKAGES=(fuse3 libfuse3-dev pkg-config patch libssl-dev rsync attr acl)
# The pyfuse3 release the mount is built on, its source's sha256, and the version of the
# stripefs additions patched into it (scripts/pyfuse3-stripefs.patch: lock requests,
# fallocate, the lock owner at flush, passthrough, killpriv, requests read without a wait
# when queued, larger reads). Bump ADDITIONS with the patch
# (and with STRIPEFS_ADDITIONS in it) so that existing virtualenvs rebuild it.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_ADDITIONS=6

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
    apt_install "${missing[@]}"
}

# Installs Debian packages without questions (as root, through sudo when not root).
apt_install() {
    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "missing packages $*, and not root to install them"
        sudo=(sudo)
    fi
    log "installing Debian packages: $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Creates .venv and installs the project with its test extras, only when the venv is
# missing or pyproject.toml, setup.py or a C source changed since the last install.
ensure_venv() {
    if [[ ! -x "$STRIPEFS_VENV/bin/python" ]]; then
        log "creating virtualenv $STRIPEFS_VENV"
        python3 -m venv "$STRIPEFS_VENV"
    fi
    # First, so that installing the project finds its pyfuse3 there and builds no other.
    ensure_pyfuse3
    local changed=0 source
    for source in "$STRIPEFS_ROOT/pyproject.toml" "$STRIPEFS_ROOT/setup.py" "$STRIPEFS_ROOT"/proto/*.c; do
        [[ "$source" -nt "$STRIPEFS_STAMP" ]] && changed=1
    done
    if [[ ! -f "$STRIPEFS_STAMP" || $changed == 1 ]]; then
        log "installing stripefs and its dependencies into $STRIPEFS_VENV"
        "$STRIPEFS_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${STRIPEFS_ROOT}[test]"
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

# --- A private PostgreSQL for the metadata (`stripefs meta --engine postgres --dsn DSN`).
#
# One instance lives in one directory DIR, which root owns:
#   DIR/data          its data directory: the postgres user's, 0700, as PostgreSQL requires
#   DIR/sock          its Unix socket, the only way in: listen_addresses is '' (no TCP port)
#   DIR/postgres.log  what initdb and the server write
# Any role may log in through the socket without a password (`trust`). That gives nobody
# anything new: DIR/sock is the postgres user's and 0700, so only postgres and root can
# connect to it, and both can already read and write DIR/data directly.
# The server runs as the postgres user (it refuses root), so these functions need root.
# scripts/up and tests/pg.py call pg_instance_init DIR, pg_instance_start DIR,
# pg_instance_stop DIR [MODE], pg_instance_pid DIR and pg_instance_dsn DIR.

# The OS user the server runs as, and the role and database the metaservers use.
STRIPEFS_PG_OS_USER=postgres
STRIPEFS_PG_ROLE=stripefs
# With no TCP listener the port only names the socket file (DIR/sock/.s.PGSQL.5432), so
# every instance can use the default. DSNs name it anyway: a PGPORT in the environment
# would otherwise send libpq to a socket file that is not there.
STRIPEFS_PG_PORT=5432
# How long the server may take to start or stop before we give up (and show its log).
STRIPEFS_PG_TIMEOUT_S=30

# Installs Debian's PostgreSQL when there is no initdb under /usr/lib/postgresql/*/bin.
ensure_postgres() {
    if [[ "${STRIPEFS_SKIP_INSTALL:-}" == 1 ]] || pg_bindir >/dev/null; then
        return 0
    fi
    command -v dpkg-query >/dev/null 2>&1 ||
        die "no PostgreSQL, and not Debian: install one under /usr/lib/postgresql/VERSION/bin"
    _pg_require_root
    apt_install postgresql
    pg_quiet_system_clusters
    pg_bindir >/dev/null || die "installed postgresql, but there is no initdb under /usr/lib/postgresql/*/bin"
}

# The package makes a default cluster (VERSION/main, on TCP port 5432) and starts it where
# it can: under systemd, or through its init script when no policy-rc.d forbids it. Ours
# are private instances, so right after installing, every cluster postgresql-common knows
# is stopped and kept from starting at boot (start.conf `manual`, which the init script
# and the systemd generator both read). Its files stay, for `pg_ctlcluster VERSION main start`.
pg_quiet_system_clusters() {
    local version name port status _rest
    while read -r version name port status _rest; do
        [[ -n "$name" ]] || continue
        if [[ "$status" == online* ]]; then
            pg_ctlcluster "$version" "$name" stop ||
                log "warning: could not stop PostgreSQL's cluster $version/$name (port $port)"
        fi
        echo manual >"/etc/postgresql/$version/$name/start.conf"
    done < <(pg_lsclusters -h 2>/dev/null)
}

# The directory of PostgreSQL's programs: the version that made DIR's data directory when
# a DIR with one is given, else the newest installed. Fails when there is none.
pg_bindir() {
    local dir="${1:-}" initdb
    if [[ -n "$dir" && -s "$dir/data/PG_VERSION" ]]; then
        initdb="/usr/lib/postgresql/$(<"$dir/data/PG_VERSION")/bin/initdb"
    else
        initdb="$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)"
    fi
    [[ -x "$initdb" ]] || return 1
    printf '%s\n' "${initdb%/initdb}"
}

_pg_require_root() {
    [[ $(id -u) == 0 ]] || die "a private PostgreSQL runs as the $STRIPEFS_PG_OS_USER user: this needs root"
}

# Runs a command as the server's user, from a directory it may enter.
_pg_as() {
    (cd / && runuser -u "$STRIPEFS_PG_OS_USER" -- "$@")
}

# Lets the server's user reach PATH (absolute) through directories it may not enter (a
# state directory made under umask 077; pytest's /tmp/pytest-of-root is 0700): each gets an
# ACL entry granting that user search (x) alone, rather than being opened to everyone.
pg_grant_traverse() {
    local prefix="" part parts
    IFS=/ read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        [[ -n "$part" ]] || continue
        prefix="$prefix/$part"
        _pg_as test -x "$prefix" && continue
        setfacl -m "u:$STRIPEFS_PG_OS_USER:x" "$prefix" ||
            die "cannot let $STRIPEFS_PG_OS_USER enter $prefix (setfacl is in Debian's acl package)"
    done
}

# Makes the instance in DIR (absolute), stopped, with a role `stripefs` and a database
# `stripefs` it owns. Does nothing when DIR has one: DIR/data appears (by a rename) only
# once all of it is made, so an initialisation cut short is started again from scratch.
pg_instance_init() {
    local dir="$1"
    [[ -d "$dir/data" ]] && return 0
    _pg_require_root
    local bin sock="$dir/sock" work="$dir/data.init" log="$dir/postgres.log"
    bin="$(pg_bindir)" || die "PostgreSQL is not installed (ensure_postgres installs it)"
    # sun_path holds 107 bytes and a NUL; the socket file's name takes 16 of them.
    ((${#sock} + 16 <= 107)) || die "$sock is too long a path for a Unix socket; choose a shorter directory"
    mkdir -p "$dir"
    pg_grant_traverse "$dir"
    # An initialisation cut short may have left its server running.
    if [[ -s "$work/postmaster.pid" ]]; then
        _pg_as "$bin/pg_ctl" -D "$work" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
    install -d -o "$STRIPEFS_PG_OS_USER" -m 0700 "$work" "$sock"
    [[ -e "$log" ]] || install -o "$STRIPEFS_PG_OS_USER" -m 0600 /dev/null "$log"
    # The C locale, which every system has: text sorts by its bytes, the same on every
    # machine and across glibc upgrades (which can reorder a language's collation under an
    # index). The metadata keeps names as bytea anyway.
    if ! _pg_as "$bin/initdb" -D "$work" -U "$STRIPEFS_PG_OS_USER" --locale=C --encoding=UTF8 \
        --auth=trust --no-instructions >>"$log" 2>&1; then
        log_tail "$log"
        die "initdb failed in $work"
    fi
    cat >>"$work/postgresql.conf" <<CONF

# --- stripefs (scripts/_common.sh, pg_instance_init): reached only through its socket
listen_addresses = ''
unix_socket_directories = '${sock//\'/\'\'}'
port = $STRIPEFS_PG_PORT
CONF
    cat >"$work/pg_hba.conf" <<CONF
# stripefs (scripts/_common.sh, pg_instance_init): the Unix socket only, in a directory
# that only root and $STRIPEFS_PG_OS_USER may enter.
# TYPE  DATABASE  USER  METHOD
local   all       all   trust
CONF
    _pg_server_start "$bin" "$work" "$dir"
    if ! "$bin/psql" -X -q -v ON_ERROR_STOP=1 -d "$(_pg_conninfo "$dir" "$STRIPEFS_PG_OS_USER" postgres)" \
        -c "CREATE ROLE $STRIPEFS_PG_ROLE LOGIN" \
        -c "CREATE DATABASE $STRIPEFS_PG_ROLE OWNER $STRIPEFS_PG_ROLE" >>"$log" 2>&1; then
        _pg_as "$bin/pg_ctl" -D "$work" -m immediate -w stop >/dev/null 2>&1 || true
        log_tail "$log"
        die "cannot create the role and the database $STRIPEFS_PG_ROLE in $work"
    fi
    _pg_as "$bin/pg_ctl" -D "$work" -m fast -w -t "$STRIPEFS_PG_TIMEOUT_S" stop >/dev/null ||
        die "PostgreSQL in $work did not stop after its initialisation"
    mv "$work" "$dir/data"
}

# Starts the instance in DIR unless it runs already; returns once it accepts connections.
pg_instance_start() {
    local dir="$1" bin
    [[ -d "$dir/data" ]] || die "no PostgreSQL instance in $dir (pg_instance_init makes one)"
    pg_instance_pid "$dir" >/dev/null && return 0
    _pg_require_root
    bin="$(pg_bindir "$dir")" || die "PostgreSQL $(<"$dir/data/PG_VERSION"), which made $dir/data, is not installed"
    # Again, not only at init: a chmod of a parent since then clears the ACL's mask (pytest
    # takes group and other bits off /tmp/pytest-of-root at every session).
    pg_grant_traverse "$dir"
    _pg_server_start "$bin" "$dir/data" "$dir"
}

# pg_ctl start, which waits until the server says it is ready; then pg_isready through the
# socket DSNs name, which proves that the server listens where the metaservers will look.
_pg_server_start() {
    local bin="$1" data="$2" dir="$3"
    if ! _pg_as "$bin/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t "$STRIPEFS_PG_TIMEOUT_S" start >/dev/null; then
        log_tail "$dir/postgres.log"
        die "PostgreSQL in $data did not start (its log is above)"
    fi
    if ! "$bin/pg_isready" -q -d "$(_pg_conninfo "$dir" "$STRIPEFS_PG_OS_USER" postgres)"; then
        log_tail "$dir/postgres.log"
        die "PostgreSQL in $data started but accepts no connections on $dir/sock"
    fi
}

# Stops the instance in DIR if it runs. MODE is pg_ctl's: `fast` (the default: roll back
# open transactions, checkpoint) or `immediate` (abort, as in a crash; the next start
# recovers from the WAL). A fast stop that takes too long is made immediate.
pg_instance_stop() {
    local dir="$1" mode="${2:-fast}" bin pid
    [[ "$mode" == fast || "$mode" == immediate ]] || die "pg_instance_stop: the mode is fast or immediate, not '$mode'"
    pid="$(pg_instance_pid "$dir")" || return 0
    _pg_require_root
    bin="$(pg_bindir "$dir")" || die "the PostgreSQL that made $dir/data is not installed"
    if ! _pg_as "$bin/pg_ctl" -D "$dir/data" -m "$mode" -w -t "$STRIPEFS_PG_TIMEOUT_S" stop >/dev/null; then
        log "PostgreSQL in $dir did not stop within ${STRIPEFS_PG_TIMEOUT_S}s ($mode); stopping it immediately"
        _pg_as "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t "$STRIPEFS_PG_TIMEOUT_S" stop >/dev/null ||
            die "cannot stop PostgreSQL in $dir"
    fi
    # pg_ctl returns once the server removed postmaster.pid, which it does just before it
    # exits: wait for the process itself, so that nothing of the instance runs on return.
    local waited=0
    while pid_running "$pid" && ((waited < STRIPEFS_PG_TIMEOUT_S * 10)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    ! pid_running "$pid" || die "PostgreSQL in $dir (pid $pid) is still running after pg_ctl stop"
}

# Prints the pid of the instance's server (its postmaster) when it runs, else fails.
pg_instance_pid() {
    local dir="$1" bin status
    [[ -s "$dir/data/postmaster.pid" ]] || return 1
    _pg_require_root
    bin="$(pg_bindir "$dir")" || return 1
    # pg_ctl checks that the pid in postmaster.pid is alive: a file left by a crash makes
    # it say that no server runs.
    status="$(_pg_as "$bin/pg_ctl" -D "$dir/data" status 2>/dev/null)" || return 1
    [[ "$status" =~ \(PID:\ ([0-9]+)\) ]] || return 1
    printf '%s\n' "${BASH_REMATCH[1]}"
}

# Prints the libpq connection string of the instance's `stripefs` database as the
# metaservers use it: host=DIR/sock port=5432 dbname=stripefs user=stripefs
pg_instance_dsn() {
    _pg_conninfo "$1" "$STRIPEFS_PG_ROLE" "$STRIPEFS_PG_ROLE"
}

# _pg_conninfo DIR USER DATABASE: a libpq connection string through DIR's socket (the
# path quoted when it has to be).
_pg_conninfo() {
    local host="$1/sock"
    if [[ ! "$host" =~ ^[A-Za-z0-9/._+@%:-]+$ ]]; then
        host="${host//\\/\\\\}"
        host="'${host//\'/\\\'}'"
    fi
    printf 'host=%s port=%s dbname=%s user=%s\n' "$host" "$STRIPEFS_PG_PORT" "$3" "$2"
}

# True when pid is a running process (not a zombie: exited, waiting to be reaped).
pid_running() {
    local pid="$1" state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/stat" ]] || return 1
    # The state letter follows the parenthesised command name, which may contain spaces.
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != Z && "$state" != X ]]
}

# True when pid is a running process whose command line mentions stripefs, so a stale pid
# file whose number was reused by another program is not mistaken for ours.
pid_alive() {
    local pid="$1"
    pid_running "$pid" || return 1
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *stripefs* ]]
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

# Unmounts `dir` if it is mounted, as `stripefs umount` does (fs/mounts.py: retried while
# busy, then detached lazily); without the virtualenv, a lazy fusermount3. False if it
# stays mounted.
unmount_dir() {
    local dir="$1"
    is_mounted "$dir" || return 0
    if [[ -x "$STRIPEFS_VENV/bin/stripefs" ]]; then
        "$STRIPEFS_VENV/bin/stripefs" umount "$dir" || true
    else
        fusermount3 -u -z "$dir" || true
    fi
    ! is_mounted "$dir"
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
