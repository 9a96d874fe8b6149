# Shared by the evaluation scripts (sourced): ``step CMD ...`` runs a command, saying when it started,
# how long it took and its peak memory; ``seed FROM TO`` starts run folder TO with FROM's request cache,
# so that only the requests whose prompt changed are answered again.
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; /usr/bin/time -f "   %e s, %M KB max RSS" "$@"; }
seed() { mkdir -p "$2"; [ -f "$2/cache.sqlite" ] || { [ -f "$1/cache.sqlite" ] && cp "$1/cache.sqlite" "$2/cache.sqlite"; } || true; }
