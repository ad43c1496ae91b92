#!/bin/sh
# The walsync sidecar's entrypoint (docs/docker.md).
#
# No argument: prepare this node with `walsync init` (idempotent), retried while its
# PostgreSQL cannot be reached yet, for at most WALSYNC_START_TIMEOUT seconds (default
# 300); then `exec walsync run`. A walsync subcommand as first argument runs only that
# (`status`, `conflicts list`, ...); any other command runs as given (`sh`).
#
# Config: the TOML file at WALSYNC_CONFIG (default /etc/walsync/walsync.toml) and/or
# WALSYNC_<SECTION>_<KEY> and WALSYNC_PEER_<NAME>_<KEY> variables. When the default file
# does not exist, an empty one stands in for it, so that variables alone configure the node.
set -eu

me=walsync-entrypoint
default_config=/etc/walsync/walsync.toml

timeout="${WALSYNC_START_TIMEOUT:-300}"
case "$timeout" in
    '' | *[!0-9]*)
        echo "$me: WALSYNC_START_TIMEOUT=$timeout: expected a number of seconds" >&2
        exit 2
        ;;
esac

config="${WALSYNC_CONFIG:-$default_config}"
env_only=false
if [ "$config" = "$default_config" ] && [ ! -e "$config" ]; then
    # A path set on purpose is left alone: walsync names it if it is missing.
    config="${TMPDIR:-/tmp}/walsync-env-only.toml"
    : >"$config"
    env_only=true
fi
export WALSYNC_CONFIG="$config"

case "${1:-}" in
    '') ;;
    init | run | status | conflicts | ddl-replay | join | remove-node | help | -h | --help | -V | --version)
        exec walsync "$@"
        ;;
    *)
        exec "$@"
        ;;
esac

if $env_only; then
    echo "$me: no $default_config: configuring from WALSYNC_* variables only" >&2
fi

# PID 1 gets no default signal handling: stop waiting on `docker stop` and Ctrl-C.
trap 'exit 143' TERM
trap 'exit 130' INT

deadline=$(($(date +%s) + timeout))
delay=1
while :; do
    if out=$(walsync init 2>&1); then
        printf '%s\n' "$out"
        break
    fi
    # Only a server that is not up yet is worth waiting for (the hints are those of
    # src/node/connect.rs); a refused init or a config error will not fix itself.
    case "$out" in
        *"cannot connect to"*"the server is unreachable"* | *"cannot connect to"*"the server refused the connection"*) ;;
        *)
            printf '%s\n' "$out" >&2
            exit 1
            ;;
    esac
    why=$(printf '%s\n' "$out" | sed -n 's/^error: //p' | tail -n 1)
    left=$((deadline - $(date +%s)))
    if [ "$left" -le 0 ]; then
        echo "$me: gave up after ${timeout}s (WALSYNC_START_TIMEOUT): ${why:-$out}" >&2
        exit 1
    fi
    [ "$delay" -le "$left" ] || delay=$left
    echo "$me: waiting for this node's PostgreSQL, retrying in ${delay}s: ${why:-$out}" >&2
    sleep "$delay" &
    wait $! # interruptible by the traps above, unlike a foreground sleep
    delay=$((delay * 2 > 10 ? 10 : delay * 2))
done

exec walsync run
