#!/usr/bin/env bash
# Stops what up.sh started in one state directory, and what was recorded there since (the node
# agent records the processes it runs for pods), then removes the directory.
#
# Usage: down.sh [STATE_DIR]   (default: the directory of $KUBECONFIG)
# Environment: DEEPSEEK_CONTROLPLANE_KEEP=1 keeps the directory (logs, certificates).
set -uo pipefail

state=${1:-$(dirname "${KUBECONFIG:?down.sh: give the state directory or set KUBECONFIG}")}
[[ -d $state/pids ]] || { echo "down.sh: $state is not a control-plane state directory" >&2; exit 1; }

# The pid and executable of a pid file, when that process still runs that executable.
running() { # file
  local pid exe
  read -r pid exe <"$1" || return 1
  [[ -n $pid && $pid != "$$" && $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe" ]] && echo "$pid"
}

pids=()
files=()
while IFS= read -r file; do
  if pid=$(running "$file"); then
    # The owner watcher leads its own process group (it and its `tail`).
    if [[ $file == *-owner-watch.pid ]]; then kill -TERM -- "-$pid" 2>/dev/null; fi
    kill -TERM "$pid" 2>/dev/null
    pids+=("$pid")
  fi
  files+=("$file")
done < <(find "$state/pids" -name '*.pid' | sort -r)

# Each process gets 30 seconds to exit on SIGTERM, then is killed.
deadline=$((SECONDS + 30))
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
done
# A killed process is gone once it is no longer in /proc (or only a zombie of another parent).
for pid in "${pids[@]}"; do
  while [[ -e /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; do sleep 0.1; done
done
rm -f "${files[@]}"

if [[ ${DEEPSEEK_CONTROLPLANE_KEEP:-0} == 1 ]]; then
  echo "down.sh: stopped; kept $state" >&2
else
  rm -rf "$state"
fi
