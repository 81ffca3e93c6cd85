#!/usr/bin/env bash
# The style and safety checks of `make check` (and CI), with clang 14:
#   scripts/check.sh format          clang-format --dry-run --Werror over the tracked sources
#   scripts/check.sh thread-safety   every translation unit parsed by clang with -Wthread-safety
#                                    as an error (the `clang` preset's flags; no code generated)
#   scripts/check.sh tidy [BASE]     clang-tidy (the repo's .clang-tidy, warnings as errors) on
#                                    the lines of C++ files changed since BASE (default:
#                                    origin/main when there is such a branch, else HEAD~1;
#                                    HEAD~1 as well when BASE is HEAD itself)
#   scripts/check.sh all             the three, in that order
# Exits non-zero, naming the file and line, on the first check that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
CLANG_FORMAT=${CLANG_FORMAT:-clang-format-14}
CLANG_TIDY=${CLANG_TIDY:-clang-tidy-14}
build=build/clang

sources() { git ls-files -- '*.h' '*.cc' '*.cu' '*.cuh'; }

# Configures the `clang` preset (for its compile_commands.json) and generates the protobuf
# headers that the service's sources include; compiles nothing else.
configure() {
  cmake --preset clang >/dev/null  # quick when configured: refreshes the list of sources
  local gen
  gen=$(ninja -C "$build" -t targets all | sed -n 's|^\([^/][^:]*\.pb\.h\): CUSTOM_COMMAND$|\1|p')
  if [ -n "$gen" ]; then
    # shellcheck disable=SC2086
    ninja -C "$build" $gen >/dev/null
  fi
}

check_format() {
  sources | xargs "$CLANG_FORMAT" --dry-run --Werror
  echo "check: clang-format: $(sources | wc -l) files formatted"
}

# `clang++ -fsyntax-only` with each translation unit's own flags: the analysis runs in the
# front end, so this finds every thread-safety error a full clang build would, for a fraction
# of its time.
check_thread_safety() {
  configure
  python3 - "$build/compile_commands.json" "$PWD" >"$build/syntax_only.sh" <<'PY'
import json, os, shlex, sys
db, root = json.load(open(sys.argv[1])), sys.argv[2]
for entry in db:
    src = os.path.relpath(entry["file"], root)
    if src.startswith("build/") or not src.endswith(".cc"):
        continue  # generated code
    args = shlex.split(entry["command"])
    out = args.index("-o")
    args = args[:out] + args[out + 2:]
    args = [a for a in args if a != "-c" and a != "ccache" and not a.endswith("/ccache")]
    print("cd %s && %s -fsyntax-only" % (shlex.quote(entry["directory"]),
                                          " ".join(shlex.quote(a) for a in args)))
PY
  local n
  n=$(wc -l <"$build/syntax_only.sh")
  tr '\n' '\0' <"$build/syntax_only.sh" | xargs -0 -n 1 -P "$JOBS" bash -c
  echo "check: thread-safety: $n translation units clean"
}

# clang-tidy with warnings as errors, on the lines a change adds or modifies (what a change is
# answerable for), in every translation unit it touches; a changed header is checked through the
# source beside it (foo.h -> foo.cc).
check_tidy() {
  local base=${1:-}
  if [ -z "$base" ]; then
    if git rev-parse -q --verify origin/main >/dev/null; then base=origin/main; else base=HEAD~1; fi
  fi
  configure
  local merge_base
  merge_base=$(git merge-base "$base" HEAD)
  # On main itself (origin/main is HEAD), the change is the last commit.
  if [ "$merge_base" = "$(git rev-parse HEAD)" ]; then
    if ! merge_base=$(git rev-parse -q --verify HEAD~1); then
      echo "check: clang-tidy: no parent commit to compare with (shallow clone?): skipped"
      return
    fi
    base=HEAD~1
  fi
  python3 - "$merge_base" "$build" >"$build/tidy.args" <<'PY'
import json, os, re, subprocess, sys
base, build = sys.argv[1], sys.argv[2]
diff = subprocess.run(["git", "diff", "-U0", "--diff-filter=d", base, "--", "*.cc", "*.h"],
                      capture_output=True, text=True, check=True).stdout
ranges, current = {}, None
for line in diff.splitlines():
    if line.startswith("+++ "):
        current = line[6:] if line.startswith("+++ b/") else None
    elif line.startswith("@@") and current:
        m = re.match(r"@@ -\S+ \+(\d+)(?:,(\d+))? @@", line)
        start, count = int(m.group(1)), int(m.group(2) or 1)
        if count:
            ranges.setdefault(current, []).append([start, start + count - 1])
in_db = {os.path.relpath(e["file"]) for e in json.load(open(build + "/compile_commands.json"))}
units = sorted({f[:-2] + ".cc" if f.endswith(".h") else f for f in ranges} & in_db)
line_filter = json.dumps([{"name": f, "lines": r} for f, r in sorted(ranges.items())])
for unit in units:
    print(json.dumps([unit, line_filter]))
PY
  local n
  n=$(wc -l <"$build/tidy.args")
  if [ "$n" -eq 0 ]; then
    echo "check: clang-tidy: no C++ translation unit changed since $base"
    return
  fi
  python3 - "$build" "$CLANG_TIDY" "$JOBS" "$build/tidy.args" <<'PY'
import concurrent.futures, json, subprocess, sys
build, tidy, jobs, units = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def run(args):
    unit, line_filter = args
    return subprocess.run([tidy, "-p", build, "--quiet", "--warnings-as-errors=*",
                           "--line-filter=" + line_filter, unit],
                          capture_output=True, text=True)
failed = 0
with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    for r in pool.map(run, [json.loads(line) for line in open(units)]):
        if r.returncode != 0:
            failed += 1
            sys.stdout.write(r.stdout + r.stderr)
sys.exit(1 if failed else 0)
PY
  echo "check: clang-tidy: the changed lines of $n translation units since $base clean"
}

case "${1:-all}" in
  format) check_format ;;
  thread-safety) check_thread_safety ;;
  tidy) check_tidy "${2:-}" ;;
  all) check_format; check_thread_safety; check_tidy "${2:-}" ;;
  *) echo "usage: scripts/check.sh [format|thread-safety|tidy [BASE]|all]" >&2; exit 2 ;;
esac
