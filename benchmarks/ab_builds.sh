#!/usr/bin/env bash
# A/B of source variants in one device call (kernel development tool). Builds the tree as it is ("base")
# and one copy per patch (patch -p1), each in its own directory under .devout/ab/, in parallel with the
# peers (.peers/build.sh, on a GPU machine where .peers/ is here and not built yet); then runs COMMAND in
# each build's directory in the order base, v1 .. vn, vn .. v1, base (one process each: a build is a
# module, so builds cannot share a process; the reversed second half cancels clock drift across the call).
#
#   bash benchmarks/ab_builds.sh DEADLINE_S "COMMAND" PATCH...
#   e.g. bash benchmarks/ab_builds.sh 500 "python -m benchmarks.ab_fp8_gemm --configs auto" a.diff b.diff
#
# A run that would start after DEADLINE_S seconds (from the start of this script) is skipped, and says
# so. Each process's output is prefixed with its build's name (the patch file's stem). Build logs go to
# $OUT/ab_logs when OUT is set (the device tool's output folder), else .devout/ab/logs.
# AB_BUILD overrides the build command (default: python setup.py build_ext --inplace).
set -uo pipefail
deadline=$1
command=$2
shift 2
root=$(pwd)
start=$(date +%s)
logs=${OUT:+$OUT/ab_logs}
logs=${logs:-$root/.devout/ab/logs}
build=${AB_BUILD:-python setup.py build_ext --inplace}
mkdir -p "$logs"
elapsed() { echo $(( $(date +%s) - start )); }

names=(base)
for patch in "$@"; do
  [ -f "$patch" ] || { echo "ab_builds: no patch file $patch"; exit 2; }
  names+=("$(basename "${patch%.*}")")
done
jobs_each=$(( $(nproc) / ${#names[@]} ))
jobs_each=$(( jobs_each < 1 ? 1 : jobs_each ))

rm -rf .devout/ab/src
for i in "${!names[@]}"; do
  dir=$root/.devout/ab/src/${names[$i]}
  mkdir -p "$dir"
  tar cf - --exclude=./.devout --exclude=./.peers --exclude=./.git --exclude=./build . | tar xf - -C "$dir"
  if [ "$i" -gt 0 ]; then
    patch_file=$(realpath "${@:$i:1}")
    (cd "$dir" && patch -s -p1 --forward < "$patch_file") || { echo "ab_builds: ${names[$i]} does not apply"; exit 2; }
  fi
done
if [ -d .peers ] && command -v nvidia-smi > /dev/null && ! ls .peers/DeepGEMM/deep_gemm/*.so > /dev/null 2>&1; then
  OUT=$logs bash .peers/build.sh > "$logs/peers.txt" 2>&1 &
fi
for name in "${names[@]}"; do
  (cd "$root/.devout/ab/src/$name" && MAX_JOBS=$jobs_each $build > "$logs/build_$name.log" 2>&1
   echo "[$(elapsed)s] $name build exit $?") &
done
wait
cat "$logs/peers.txt" 2>/dev/null
peers_path=$root/.peers/DeepGEMM:$root/.peers/FlashMLA

order=("${names[@]}")
for (( i=${#names[@]}-1; i>=0; i-- )); do order+=("${names[$i]}"); done
for name in "${order[@]}"; do
  if [ "$(elapsed)" -ge "$deadline" ]; then
    echo "[$(elapsed)s] $name: skipped (deadline)"
    continue
  fi
  echo "[$(elapsed)s] $name"
  (cd "$root/.devout/ab/src/$name" && PYTHONPATH=$PWD:$peers_path \
     timeout $(( deadline - $(elapsed) + 30 )) bash -c "$command" 2>&1 | grep -v Warning | sed "s/^/$name | /")
done
echo "[$(elapsed)s] done"
