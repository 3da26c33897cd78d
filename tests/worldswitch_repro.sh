#!/bin/bash
# Issue 20 item 6 (the SVM world-switch fault): boots the reproductions the issue names, N times,
# in a checkout of any commit, and counts the runs that show the fault. Used for the bisect in
# docs/src/notes/worldswitch.md ("Reproducing at the commit the issue was filed against").
#
#   tests/worldswitch_repro.sh CHECKOUT RUNS [VARIANTS]
#
# CHECKOUT: a work tree of this repository at any commit (e.g. one made with
#   `git worktree add --detach /tmp/old 68717dd`); a commit that predates the `churn` guest or
#   the `qemu-svm-tcg-stress` config gets this checkout's copies (untracked files there).
# RUNS: boots in all, taking the variants in turn.
# VARIANTS (comma-separated, default all):
#   demo      the default demo (`cargo xtask run`'s guests) on qemu-svm, log=info
#   demo16    the same under qemu-svm-tcg-stress (-accel tcg,tb-size=16)
#   churn27   27 churn guests x 100,000 rounds, tb-size=16, log=warn, stopped after 30 s
#   churn60   60 churn guests x 100,000 rounds, tb-size=16, log=warn, stopped after 45 s
#   info27    churn27 at log=info (the console, and so QEMU's iothread lock, busy all the time)
#   smpdemo   the demo plus smp:arg=5:vcpus=4 and two churn guests, tb-size=16
# A run counts as a hit if the console shows a guest stopped for an access outside its memory,
# an exit with the host's state, an emulator or hypervisor fault, or a RIP in the hypervisor's
# image. Logs go to $LOGS (default /tmp/worldswitch-repro).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
wt=$(cd "$1" && pwd); runs=$2; variants=${3:-demo,demo16,churn27,churn60,info27,smpdemo}
logs=${LOGS:-/tmp/worldswitch-repro}; mkdir -p "$logs"
[ -e "$wt/tests/guests/src/bin/churn.rs" ] || cp "$here/tests/guests/src/bin/churn.rs" "$wt/tests/guests/src/bin/"
[ -e "$wt/qemu-configs/qemu-svm-tcg-stress.args" ] || cp "$here/qemu-configs/qemu-svm-tcg-stress.args" "$wt/qemu-configs/"
commit=$(git -C "$wt" rev-parse --short HEAD)
demo="hello,counter:cpu=0,counter:cpu=0,producer:arg=256M,consumer,consumer"
churn() { python3 -c "print(','.join(['churn:arg=100000']*$1))"; }
IFS=, read -ra vs <<<"$variants"
hits=0
for i in $(seq 1 "$runs"); do
  v=${vs[$(( (i - 1) % ${#vs[@]} ))]}
  case $v in
    demo) cfg=qemu-svm; t=90; cmd="guests=$demo";;
    demo16) cfg=qemu-svm-tcg-stress; t=60; cmd="guests=$demo";;
    churn27) cfg=qemu-svm-tcg-stress; t=30; cmd="log=warn guests=$(churn 27)";;
    churn60) cfg=qemu-svm-tcg-stress; t=45; cmd="log=warn guests=$(churn 60)";;
    info27) cfg=qemu-svm-tcg-stress; t=30; cmd="guests=$(churn 27)";;
    smpdemo) cfg=qemu-svm-tcg-stress; t=60; cmd="guests=$demo,smp:arg=5:vcpus=4,churn:arg=3000,churn:arg=3000";;
    *) echo "unknown variant $v"; exit 2;;
  esac
  log="$logs/$commit-$v-$i.log"
  (cd "$wt" && timeout $((t + 120)) cargo xtask run --config $cfg --timeout $t --cmdline "$cmd" </dev/null >"$log" 2>&1)
  rc=$?
  pat="outside its memory|host's state|emulator or hypervisor fault|hypervisor's image"
  if grep -qE "$pat" "$log"; then
    hits=$((hits + 1)); echo "$(date -u +%T) $commit $v run $i: HIT (rc $rc) $log"; grep -E "$pat" "$log" | head -2
  else
    echo "$(date -u +%T) $commit $v run $i: no fault (rc $rc)"
  fi
done
echo "$commit: $hits of $runs runs showed the fault"
