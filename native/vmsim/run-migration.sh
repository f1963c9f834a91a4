#!/bin/bash
# Migrate a uffdd-vmsim guest between two local uffdd daemons and compare hashes.
#
#   native/vmsim/run-migration.sh [--memory 256M] [--backing anon|shmem|hugetlb]
#       [--mode missing|minor] [--threads N] [--order seq|rand] [--seed N]
#       [--exits] [-- extra dest options]
#
# Starts `$PYTHON -m uffdd serve` twice (source and destination, API sockets in a
# temporary directory, peer ports on 127.0.0.1), runs `uffdd-vmsim source` and
# `uffdd-vmsim dest`, prints both JSON lines and exits 0 only if both succeeded
# and the hashes are equal. Daemon logs are kept in the temporary directory,
# whose path is printed on failure. Environment: PYTHON (default python3),
# VMSIM (default: native/build/uffdd-vmsim next to this script), PORT (default 44600).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
VMSIM="${VMSIM:-$root/native/build/uffdd-vmsim}"
PORT="${PORT:-44600}"
memory=64M backing=anon mode=missing threads=4 order=rand seed=1 exits=() extra=()
while [ $# -gt 0 ]; do
	case "$1" in
	--memory) memory="$2"; shift 2 ;;
	--backing) backing="$2"; shift 2 ;;
	--mode) mode="$2"; shift 2 ;;
	--threads) threads="$2"; shift 2 ;;
	--order) order="$2"; shift 2 ;;
	--seed) seed="$2"; shift 2 ;;
	--exits) exits=(--exits); shift ;;
	--) shift; extra=("$@"); break ;;
	*) echo "unknown option $1" >&2; exit 64 ;;
	esac
done

dir="$(mktemp -d /tmp/uffdd-migration.XXXXXX)"
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT

start_daemon() { # name port
	PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m uffdd serve \
		--api-socket "$dir/$1.sock" --peer-listen "127.0.0.1:$2" --metrics-listen "" \
		>"$dir/$1.log" 2>&1 &
	pids+=($!)
}
start_daemon src "$PORT"
start_daemon dst "$((PORT + 1))"
for _ in $(seq 100); do
	[ -S "$dir/src.sock" ] && [ -S "$dir/dst.sock" ] && break
	sleep 0.1
done
if ! [ -S "$dir/src.sock" ] || ! [ -S "$dir/dst.sock" ]; then
	echo "daemons did not start; logs in $dir" >&2
	tail -n 20 "$dir"/*.log >&2
	exit 1
fi

token="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
session="vmsim-$$"
common=(--session "$session" --token "$token" --memory "$memory" --backing "$backing" --seed "$seed")
"$VMSIM" source --socket "$dir/src.sock" "${common[@]}" --threads 2 \
	--ready-file "$dir/exported" >"$dir/source.json" &
src_pid=$!
# the export must exist before the destination connects to the source's peer port
for _ in $(seq 600); do
	[ -e "$dir/exported" ] && break
	kill -0 "$src_pid" 2>/dev/null || break
	sleep 0.1
done
"$VMSIM" dest --socket "$dir/dst.sock" "${common[@]}" --peer "127.0.0.1:$PORT" \
	--mode "$mode" --threads "$threads" --order "$order" "${exits[@]}" "${extra[@]}" \
	>"$dir/dest.json"
dst_rc=$?
wait "$src_pid"
src_rc=$?
cat "$dir/source.json" "$dir/dest.json"
hash_of() { sed -n 's/.*"hash": "\([0-9a-f]*\)".*/\1/p' "$1"; }
if [ "$src_rc" = 0 ] && [ "$dst_rc" = 0 ] && [ "$(hash_of "$dir/source.json")" = "$(hash_of "$dir/dest.json")" ]; then
	echo "migration ok: hashes equal"
	rm -rf "$dir"
	exit 0
fi
echo "migration FAILED (source rc $src_rc, dest rc $dst_rc); logs in $dir" >&2
exit 1
