"""The ``facefarm`` command line: one argparse tree, each subcommand importing what it needs lazily.

Exit 0 on success; on failure one line ``facefarm: error: <message>`` and a non-zero exit
(a traceback only with ``--debug``). The parser is exported (``build_parser``) so deployment tests
can check that the commands in Dockerfiles and manifests parse.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facefarm.client import FarmClient
    from shared.schemas import JobOptions, JobView
    from shared.settings import Settings

PROG = "facefarm"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
SWAPPERS = ("mesh", "classic", "inswapper")
SR_MODELS = ("realesrgan-x4plus", "realesrgan-x4plus-anime", "realesr-animevideov3")
_TIME = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d*)?)$")

Handler = Callable[[argparse.Namespace], int]


# --- argument types ----------------------------------------------------------------------------


def parse_time_s(text: str) -> float:
    """Seconds from ``SS``, ``SS.sss``, ``MM:SS`` or ``HH:MM:SS(.sss)``."""
    match = _TIME.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: use seconds or HH:MM:SS(.ms)")
    first, second, seconds = match.groups()
    hours, minutes = (first, second) if second is not None else (None, first)
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _gpu_list(text: str) -> str:
    if text in ("all", "none", "auto") or re.fullmatch(r"\d+(,\d+)*", text):
        return text
    raise argparse.ArgumentTypeError(f"invalid --gpus {text!r}: use all, none or a list like 0,1")


def _queue_list(text: str) -> list[str]:
    queues = [q.strip() for q in text.split(",") if q.strip()]
    if not queues:
        raise argparse.ArgumentTypeError("--queues needs at least one queue name, e.g. gpu,cpu")
    return queues


# --- parser ----------------------------------------------------------------------------------


def _common_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS keeps a subcommand's absent flag from overwriting the top-level one.
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parent


def _api_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--api", metavar="URL", help="API URL (default FACEFARM_API_URL or local)")
    parent.add_argument("--token", metavar="T", help="API token (default FACEFARM_API_TOKEN)")
    parent.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parent


def _job_options_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("job options")
    group.add_argument("--swapper", choices=SWAPPERS)
    group.add_argument("--face-selector", choices=("all", "largest", "reference"))
    group.add_argument("--reference", metavar="IMAGE", help="face to match for --face-selector reference")
    group.add_argument("--reference-distance", type=float, metavar="D")
    group.add_argument("--upscale", type=int, choices=(1, 2, 4))
    group.add_argument("--sr-model", choices=SR_MODELS)
    group.add_argument("--face-enhancer", choices=("none", "gfpgan"))
    group.add_argument("--start", type=parse_time_s, metavar="T")
    group.add_argument("--end", type=parse_time_s, metavar="T")
    group.add_argument("--codec", choices=("h264", "h265"))
    group.add_argument("--crf", type=int, metavar="N")
    group.add_argument("--preset", metavar="NAME")
    group.add_argument("--chunk-frames", type=_positive_int, metavar="N")
    group.add_argument("--hdr", choices=("refuse", "tonemap"))
    group.add_argument("--watermark", action="store_true", default=None, help="burn in a visible label")
    return parent


def _add(
    sub: Any, name: str, handler: Handler, help_text: str, parents: Sequence[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, parents=[_common_parent(), *parents]
    )
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI contract of ARCHITECTURE.md as one argparse tree."""
    parser = argparse.ArgumentParser(prog=PROG, description="FaceFarm: a face-swap video render farm.")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    api, job = _api_parent(), _job_options_parent()

    p = _add(sub, "render", _cmd_render, "render a video (embedded farm unless --api)", [api, job])
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("--face", required=True, metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    p.add_argument("--gpus", type=_gpu_list, default="auto", help="embedded mode: none forces CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = _add(sub, "submit", _cmd_submit, "submit a job and print its id", [api, job])
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("--face", required=True, metavar="IMAGE")

    for name, handler, text in (
        ("status", _cmd_status, "show a job's status"),
        ("wait", _cmd_wait, "wait for a job to finish"),
        ("cancel", _cmd_cancel, "cancel a job"),
        ("retry", _cmd_retry, "retry a failed or cancelled job"),
        ("logs", _cmd_logs, "print a job's log lines"),
        ("audit", _cmd_audit, "print a job's audit record (JSON)"),
    ):
        p = _add(sub, name, handler, text, [api])
        p.add_argument("job", metavar="JOB")
    sub.choices["wait"].add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    sub.choices["wait"].add_argument("--no-progress", action="store_true", help="no progress bar")
    p = _add(sub, "download", _cmd_download, "download a job's output", [api])
    p.add_argument("job", metavar="JOB")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    _add(sub, "list", _cmd_list, "list your jobs", [api])

    p = _add(sub, "swap-image", _cmd_swap_image, "swap the face into one image, locally", [])
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--face", required=True, metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    p.add_argument("--swapper", choices=SWAPPERS, default=None)
    p.add_argument("--store", metavar="DIR|s3://...", help="model store (default FACEFARM_MODEL_STORE)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default FACEFARM_DEVICE)")

    p = _add(sub, "api", _cmd_api, "run the HTTP API (uvicorn)", [])
    p.add_argument("--host", help="bind address (default FACEFARM_API_HOST)")
    p.add_argument("--port", type=int, help="port (default FACEFARM_API_PORT)")

    p = _add(sub, "worker", _cmd_worker, "run render/CPU workers on this node", [])
    p.add_argument("--gpus", type=_gpu_list, default="all", help="all, none, or a list like 0,1")
    p.add_argument("--per-gpu", type=_positive_int, default=1, metavar="K", help="worker processes per GPU")
    p.add_argument("--mps", choices=("auto", "managed", "external", "off"), default="auto")
    p.add_argument(
        "--queues",
        type=_queue_list,
        default=["gpu", "check"],
        metavar="gpu,check,cpu",
        help="gpu: render clients; check: one CPU process running the face check before planning; "
        "cpu: the plan/merge process (default gpu,check)",
    )
    p.add_argument("--unblock", action="store_true", help="clear this node's failure block and exit")

    _add(sub, "flower", _cmd_flower, "run Flower (requires FACEFARM_FLOWER_BASIC_AUTH)", [])
    _add(sub, "reconciler", _cmd_reconciler, "re-enqueue stalled chunks and lost merges", [])

    models = sub.add_parser(
        "models",
        help="manage the model store",
        description="manage the model store",
        parents=[_common_parent()],
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    store_parent = argparse.ArgumentParser(add_help=False)
    store_parent.add_argument("--store", metavar="DIR|s3://...", help="default FACEFARM_MODEL_STORE")
    store_parent.add_argument("--json", action="store_true", help="print machine-readable JSON")
    for name, handler, text in (
        ("fetch", _cmd_models_fetch, "download the shipped weights into the store"),
        ("list", _cmd_models_list, "list the store's models"),
        ("verify", _cmd_models_verify, "check every file's sha256"),
        ("add", _cmd_models_add, "add a weight file you are licensed to use"),
    ):
        mp = msub.add_parser(name, help=text, description=text, parents=[_common_parent(), store_parent])
        mp.set_defaults(handler=handler)
    add = msub.choices["add"]
    add.add_argument("name", metavar="NAME", help="file name in the store, e.g. inswapper_128.onnx")
    add.add_argument("path", metavar="PATH", help="the weight file to copy in")
    add.add_argument("--licence", required=True, help="the licence you use it under")
    add.add_argument("--source", required=True, help="where it came from (URL)")
    return parser


# --- shared pieces ------------------------------------------------------------------------------


def job_options_from_args(args: argparse.Namespace) -> JobOptions:
    """JobOptions from the parsed job-option flags (unset flags keep the schema's defaults)."""
    from shared.schemas import JobOptions

    fields = {
        "swapper": args.swapper,
        "face_selector": args.face_selector,
        "reference_distance": args.reference_distance,
        "upscale": args.upscale,
        "sr_model": args.sr_model,
        "face_enhancer": args.face_enhancer,
        "start_s": args.start,
        "end_s": args.end,
        "codec": args.codec,
        "crf": args.crf,
        "preset": args.preset,
        "chunk_frames": args.chunk_frames,
        "hdr": args.hdr,
        "watermark": args.watermark,
    }
    if getattr(args, "gpus", None) == "none":
        fields["gpus"] = "none"
    return JobOptions.model_validate({k: v for k, v in fields.items() if v is not None})


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse missing local inputs before any service starts or any upload begins."""
    from facefarm.client import is_uri
    from shared.errors import BadInputError

    if args.face_selector == "reference" and not args.reference:
        raise BadInputError("--face-selector reference needs --reference IMAGE")
    for flag, value in (("VIDEO", args.video), ("--face", args.face), ("--reference", args.reference)):
        if value is None or is_uri(value):
            continue
        path = Path(value)
        if not path.is_file():
            raise BadInputError(f"{flag}: no such file: {path}", path=str(path))


def _settings() -> Settings:
    from shared.settings import get_settings

    return get_settings()


def create_client(args: argparse.Namespace, settings: Settings | None = None) -> FarmClient:
    """A client for ``--api``/``--token`` (or FACEFARM_API_URL / FACEFARM_API_TOKEN)."""
    from facefarm.client import FarmClient
    from shared.errors import AuthError

    settings = settings or _settings()
    url = args.api or settings.api_url or f"http://{settings.api_host}:{settings.api_port}"
    token = args.token or settings.api_token
    if not token:
        raise AuthError("no API token: pass --token T or set FACEFARM_API_TOKEN")
    return FarmClient(url, token)


def describe(view: JobView) -> str:
    """One human line for a job."""
    parts = [view.job_id, str(view.status), f"frames {view.frames_done}/{view.frames_total}"]
    parts.append(f"chunks {view.chunks_done}/{view.chunks_total}")
    if view.fps:
        parts.append(f"{view.fps:.1f} fps")
    if view.eta_s is not None and not view.status.finished:
        parts.append(f"ETA {view.eta_s:.0f}s")
    if view.error:
        parts.append(f"error: {view.error}")
    return "  ".join(parts)


def _print_view(view: JobView, as_json: bool) -> None:
    print(view.model_dump_json() if as_json else describe(view))


class ProgressBar:
    """A tqdm bar over frames (fps and ETA from tqdm); silent when stderr is not a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None

    def __call__(self, view: JobView) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="frame", file=sys.stderr, disable=None, leave=False)
        if view.frames_total and self._bar.total != view.frames_total:
            self._bar.total = view.frames_total
        self._bar.set_description_str(str(view.status), refresh=False)
        self._bar.update(max(0, view.frames_done - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --- client commands --------------------------------------------------------------------------


def _cmd_render(args: argparse.Namespace) -> int:
    check_inputs(args)
    options = job_options_from_args(args)
    bar = ProgressBar(enabled=not (args.no_progress or args.json))
    try:
        if args.api:
            with create_client(args) as client:
                job_id = client.submit(args.video, args.face, options, reference=args.reference)
                view = client.wait(job_id, progress=bar)
                client.download(job_id, args.output)
        else:
            from facefarm.embedded import render_embedded

            view = render_embedded(
                _settings(),
                video=Path(args.video),
                face=Path(args.face),
                output=Path(args.output),
                options=options,
                reference=Path(args.reference) if args.reference else None,
                use_gpu=args.gpus != "none",
                progress=bar,
                debug=args.debug,
            )
    finally:
        bar.close()
    if args.json:
        print(view.model_dump_json())
    return EXIT_OK


def _cmd_submit(args: argparse.Namespace) -> int:
    check_inputs(args)
    options = job_options_from_args(args)
    with create_client(args) as client:
        job_id = client.submit(args.video, args.face, options, reference=args.reference)
    print(json.dumps({"job_id": job_id}) if args.json else job_id)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    with create_client(args) as client:
        _print_view(client.status(args.job), args.json)
    return EXIT_OK


def _cmd_wait(args: argparse.Namespace) -> int:
    bar = ProgressBar(enabled=not (args.no_progress or args.json))
    try:
        with create_client(args) as client:
            view = client.wait(args.job, progress=bar, timeout_s=args.timeout)
    finally:
        bar.close()
    _print_view(view, args.json)
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    with create_client(args) as client:
        _print_view(client.cancel(args.job), args.json)
    return EXIT_OK


def _cmd_retry(args: argparse.Namespace) -> int:
    with create_client(args) as client:
        _print_view(client.retry(args.job), args.json)
    return EXIT_OK


def _cmd_logs(args: argparse.Namespace) -> int:
    with create_client(args) as client:
        lines = client.logs(args.job)
    print(json.dumps(lines) if args.json else "\n".join(lines))
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    with create_client(args) as client:
        record = client.audit(args.job)
    print(json.dumps(record, indent=None if args.json else 2, sort_keys=True))
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    with create_client(args) as client:
        path = client.download(args.job, args.output)
    print(json.dumps({"path": str(path)}) if args.json else path)
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    with create_client(args) as client:
        views = client.list()
    if args.json:
        print(json.dumps([v.model_dump(mode="json") for v in views]))
    else:
        for view in views:
            print(describe(view))
    return EXIT_OK


# --- local / service commands -----------------------------------------------------------------


def _local_store(location: str, settings: Settings) -> Path:
    """A local directory for a store location (an S3 store is mirrored into a cache first)."""
    from shared.model_store import resolve_store

    return resolve_store(location, settings=settings, cache_dir=store_cache_dir(location))


def store_cache_dir(location: str) -> Path:
    """Where an S3 store is mirrored locally (one directory per store URI)."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "facefarm-model-cache" / digest


def _cmd_swap_image(args: argparse.Namespace) -> int:
    from shared.errors import BadInputError
    from shared.schemas import DEFAULT_SWAPPER
    from worker.models.swap_image import swap_image
    from worker.runtime.device import select_device

    settings = _settings()
    for flag, value in (("--face", args.face), ("TARGET", args.target)):
        if not Path(value).is_file():
            raise BadInputError(f"{flag}: no such file: {value}", path=value)
    store = _local_store(args.store or settings.model_store, settings)
    device = select_device(args.device or settings.device)
    swap_image(
        Path(args.face),
        Path(args.target),
        Path(args.output),
        swapper=args.swapper or DEFAULT_SWAPPER,
        store=store,
        device=device,
        label=settings.synthetic_label,
    )
    print(args.output)
    return EXIT_OK


def _cmd_api(args: argparse.Namespace) -> int:
    from dispatcher.app import serve_api

    settings = _settings()
    update = {k: v for k, v in (("api_host", args.host), ("api_port", args.port)) if v is not None}
    serve_api(settings.model_copy(update=update))
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from facefarm.launcher import run_workers

    return run_workers(
        _settings(),
        gpus=args.gpus,
        per_gpu=args.per_gpu,
        mps=args.mps,
        queues=args.queues,
        unblock=args.unblock,
    )


def flower_args(settings: Settings, python: str = sys.executable) -> list[str]:
    """The Flower command line (the password travels in the environment, not in ``ps``)."""
    return [
        python,
        "-m",
        "celery",
        "-A",
        "dispatcher.celery_app",
        "flower",
        f"--port={settings.flower_port}",
    ]


# Flower's default tasks page hides args; ours carry the job id and chunk index (the argsrepr).
FLOWER_TASKS_COLUMNS = "name,uuid,state,args,received,runtime,worker"


def flower_env(settings: Settings, base_env: dict[str, str]) -> dict[str, str]:
    """Flower's environment: ``base_env`` plus FLOWER_BASIC_AUTH (and the task columns unless set);
    refuses to run without auth."""
    from shared.errors import ConfigError

    auth = settings.flower_basic_auth or ""
    user, sep, password = auth.partition(":")
    if not (user and sep and password):
        raise ConfigError(
            "refusing to start Flower without auth: set FACEFARM_FLOWER_BASIC_AUTH=user:password"
        )
    return {"FLOWER_TASKS_COLUMNS": FLOWER_TASKS_COLUMNS, **base_env, "FLOWER_BASIC_AUTH": auth}


def _cmd_flower(args: argparse.Namespace) -> int:
    import os

    settings = _settings()
    # Flower gets this process's environment (FACEFARM_* included) plus its auth, and replaces
    # this process, so a supervisor's SIGTERM reaches Flower itself and nothing is orphaned.
    argv = flower_args(settings)
    os.execve(argv[0], argv, flower_env(settings, dict(os.environ)))


def _cmd_reconciler(args: argparse.Namespace) -> int:
    import signal
    import threading

    from dispatcher.reconciler import run_reconciler

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_reconciler(_settings(), stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from shared.errors import ModelStoreError
    from shared.model_store import fetch_store, push_store_to_s3, sync_store_from_s3

    settings = _settings()
    location = args.store or settings.model_store
    if location.startswith("s3://"):
        local = store_cache_dir(location)
        try:
            sync_store_from_s3(location, local, settings=settings)
        except ModelStoreError:
            pass  # incomplete remote store: fetch fills the gaps locally, then we push
        written = fetch_store(local)
        push_store_to_s3(local, location, settings=settings)
    else:
        written = fetch_store(Path(location))
    if args.json:
        print(json.dumps({"store": location, "written": [str(p) for p in written]}))
    else:
        print(f"{location}: {len(written)} file(s) written" if written else f"{location}: up to date")
    return EXIT_OK


def _cmd_models_list(args: argparse.Namespace) -> int:
    import dataclasses

    from shared.model_store import list_models

    settings = _settings()
    entries = list_models(_local_store(args.store or settings.model_store, settings))
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in entries]))
    else:
        for e in entries:
            mark = "ok " if e.present else "-- "
            print(f"{mark}{e.name:40} {e.origin:8} {e.size_bytes:>12}  {e.licence}")
    return EXIT_OK


def _cmd_models_verify(args: argparse.Namespace) -> int:
    from shared.errors import ModelStoreError
    from shared.model_store import fetch_command, verify_store

    settings = _settings()
    location = args.store or settings.model_store
    problems = verify_store(_local_store(location, settings))
    if args.json:
        print(json.dumps({"store": location, "problems": problems}))
    if problems:
        raise ModelStoreError(
            f"model store {location}: {'; '.join(problems)}; repair with `{fetch_command(location)}`"
        )
    if not args.json:
        print(f"{location}: all files present and verified")
    return EXIT_OK


def _cmd_models_add(args: argparse.Namespace) -> int:
    from shared.errors import BadInputError
    from shared.model_store import add_model, push_store_to_s3

    settings = _settings()
    location = args.store or settings.model_store
    source = Path(args.path)
    if not source.is_file():
        raise BadInputError(f"PATH: no such file: {source}", path=str(source))
    local = store_cache_dir(location) if location.startswith("s3://") else Path(location)
    entry = add_model(local, args.name, source, licence=args.licence, source=args.source)
    if location.startswith("s3://"):
        push_store_to_s3(local, location, settings=settings)
    print(f"added {entry.name} ({entry.sha256[:12]}) to {location}")
    return EXIT_OK


# --- entry point ----------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    """A single line for the user: the error's message, pydantic errors condensed."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return "invalid options: " + "; ".join(parts)
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one place every failure becomes one line
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
