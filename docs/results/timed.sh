# Sourced by the scripts of docs/results/: timed OUT.txt CMD... runs CMD with its stdout and
# stderr into OUT.txt, then appends the wall and user time.
timed() {
  local out=$1
  shift
  /usr/bin/time -f "%e s wall, %U s user" -o /tmp/tl_time.$$ "$@" >"$out" 2>&1
  cat /tmp/tl_time.$$ >>"$out"
  rm -f /tmp/tl_time.$$
}
