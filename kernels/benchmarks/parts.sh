# Sourced by the GPU scripts: part NAME SECONDS CMD... runs CMD under its own time limit, logs to
# $OUT_DIR/NAME.log, keeps its JSON rows as NAME.jsonl, prints the log's tail (TAIL lines, default
# 40) and records the exit code in $OUT_DIR/status.txt. Needs OUT_DIR and T0 (the start time).
part() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit} s, at $(( $(date +%s) - T0 )) s) ==="
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep '^{' "$OUT_DIR/$name.log" >"$OUT_DIR/$name.jsonl" 2>/dev/null || rm -f "$OUT_DIR/$name.jsonl"
    grep -v '^{' "$OUT_DIR/$name.log" | tail -n "${TAIL:-40}"
    echo "=== $name: exit $rc$( { [ $rc = 124 ] || [ $rc = 137 ]; } && echo ' (TIME LIMIT)') ==="
    echo "$name $rc" >>"$OUT_DIR/status.txt"
}
