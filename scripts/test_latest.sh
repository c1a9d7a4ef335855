#!/usr/bin/env bash
# `make test-latest`: the fast suite on the newest versions pyproject.toml's ranges allow, in
# a throwaway venv (.venv-latest), so that moving the lock is a deliberate act with a known
# outcome. Not on CI's path: it asks the index for whatever is newest today.
#
# Prints what would move (locked -> latest) and the suite's outcome; writes both to
# build/latest/report.md beside the resolution (build/latest/cpu-latest.txt). The torch pair
# stays at constraints/cpu.txt (a new torch is a change of its own: edit that file, then
# `make lock`); LATEST_TORCH=1 lets it float too. KEEP=1 keeps .venv-latest afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
[ -x "$UV" ] || { echo "test_latest.sh: no $UV; run 'make install' first" >&2; exit 2; }
OUT=build/latest
VENV=.venv-latest
mkdir -p "$OUT"
torch=(--constraints constraints/cpu.txt)
[ "${LATEST_TORCH:-0}" = "1" ] && torch=()

"$UV" pip compile pyproject.toml constraints/packaged.in --extra dev \
    --overrides constraints/overrides.txt "${torch[@]}" --quiet \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --output-file "$OUT/cpu-latest.txt" || exit 2
moved=$(python3 scripts/lock_diff.py --moved constraints/cpu.lock "$OUT/cpu-latest.txt")

rm -rf "$VENV"
python3 -m venv "$VENV"
unlisted='/is ignored: it is neither a file nor a directory/d'
"$VENV/bin/python" -m pip install -q --no-deps -r "$OUT/cpu-latest.txt" 2>&1 | sed "$unlisted"
PYTHONWARNINGS="ignore:Editable installation" \
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | sed "$unlisted"

start=$(date +%s)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
{
  echo "# make test-latest, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "What moves from constraints/cpu.lock to the newest versions allowed:"
  echo
  echo "$moved"
  echo
  echo "Fast suite on them: exit $status in $(( $(date +%s) - start )) s; its last lines:"
  echo
  echo '```'
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -40
  echo '```'
} > "$OUT/report.md"
echo; cat "$OUT/report.md"
[ "${KEEP:-0}" = "1" ] || rm -rf "$VENV"
exit "$status"
