#!/usr/bin/env bash
# make dist-check: the sdist and wheel as `python -m build` makes them, installed as a user installs them.
#
# A fresh venv gets torch from the package registry, then `pip install <wheel>` with default settings
# (the wheel has no C++ extension: pip's build isolation had no torch). The smoke test then imports
# fused_ft, which builds the extension just in time into an empty cache, checks that no extra was
# installed, steps every optimizer on the cpu backend against torch.optim (SGD, AdamW) and fused_ft's
# reference backend (LARS, LAMB: timm is an extra), and runs the doctor, as a module and as a command.
# Slow (the compile takes minutes on 2 cores); tests/test_install.py is the suite's cheaper version.
set -euo pipefail

PY=${PY:-.venv/bin/python}      # has `build` (requirements-dev.txt)
BASE_PYTHON=${PYTHON:-python3}  # the interpreter of the fresh venv
TORCH=${TORCH:-torch==2.14.1}   # the dev pin (the package itself accepts torch>=2.5)

work=$(mktemp -d "${TMPDIR:-/tmp}/fused_ft-dist-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
venv="$work/venv"
cache="$work/cache"

echo "== python -m build: the sdist, then the wheel from it (build isolation: no torch)"
"$PY" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "$(basename "$sdist") $(basename "$wheel")"
sdist_files=$(tar tzf "$sdist")
wheel_files=$("$PY" -m zipfile -l "$wheel")
for f in csrc/*.cpp csrc/*.h; do
    grep -q "/$f\$" <<<"$sdist_files" || { echo "the sdist lacks $f"; exit 1; }
    grep -q "fused_ft/$f " <<<"$wheel_files" || { echo "the wheel lacks fused_ft/$f"; exit 1; }
done
if grep -qE '\.(so|pyd) ' <<<"$wheel_files"; then echo "the wheel holds a compiled extension"; exit 1; fi
echo "both hold csrc/; the wheel is pure Python (the extension is built where it runs)"

echo "== a fresh venv with $TORCH"
"$BASE_PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q "$TORCH"

echo "== pip install $(basename "$wheel") (default settings)"
"$venv/bin/python" -m pip install -q "$wheel"
for extra in timm open_clip_torch matplotlib; do
    if "$venv/bin/python" -m pip show -q "$extra" >/dev/null 2>&1; then
        echo "$extra was installed without asking for an extra"; exit 1
    fi
done
echo "not installed: timm, open_clip_torch, matplotlib"

echo "== smoke test: the first import builds the C++ extension just in time (empty cache)"
unset TRITON_INTERPRET FUSED_FT_BUILD
export FUSED_FT_CACHE="$cache"
start=$(date +%s)
(cd "$work" && "$venv/bin/python" "$OLDPWD/tests/install_smoke.py" --prefix "$venv" --cache "$cache")
echo "(smoke test with the build: $(( $(date +%s) - start )) s)"

echo "== python -m fused_ft.doctor, and fused-ft doctor, in that venv (the build is cached now)"
start=$(date +%s)
(cd "$work" && "$venv/bin/python" -m fused_ft.doctor)
(cd "$work" && "$venv/bin/fused-ft" doctor >/dev/null)
echo "(both, from the cache: $(( $(date +%s) - start )) s)"
echo "dist-check passed"
