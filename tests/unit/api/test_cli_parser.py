"""The CLI contract of ARCHITECTURE.md: every subcommand and option parses to what it promises."""

from __future__ import annotations

import argparse

import pytest

from facefarm.cli import (
    FLOWER_TASKS_COLUMNS,
    build_parser,
    flower_args,
    flower_env,
    job_options_from_args,
    main,
    parse_time_s,
)
from shared.errors import ConfigError
from shared.schemas import JobOptions
from shared.settings import Settings

ALL_JOB_OPTIONS = [
    "--swapper", "inswapper", "--face-selector", "reference", "--reference", "ref.png",
    "--reference-distance", "0.7", "--upscale", "4", "--sr-model", "realesr-animevideov3",
    "--face-enhancer", "gfpgan", "--start", "1.5", "--end", "00:01:02.25", "--codec", "h265",
    "--crf", "23", "--preset", "slow", "--chunk-frames", "120", "--hdr", "tonemap", "--watermark",
]  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_render_parses_every_job_option_into_job_options() -> None:
    args = parse("render", "in.mp4", "--face", "f.png", "-o", "out.mp4", *ALL_JOB_OPTIONS, "--gpus", "none")
    assert (args.video, args.face, args.output, args.reference) == ("in.mp4", "f.png", "out.mp4", "ref.png")
    assert job_options_from_args(args) == JobOptions(
        swapper="inswapper",
        face_selector="reference",
        reference_distance=0.7,
        upscale=4,
        sr_model="realesr-animevideov3",
        face_enhancer="gfpgan",
        start_s=1.5,
        end_s=62.25,
        codec="h265",
        crf=23,
        preset="slow",
        chunk_frames=120,
        hdr="tonemap",
        watermark=True,
        gpus="none",
    )


def test_unset_job_options_keep_the_schema_defaults() -> None:
    args = parse("submit", "in.mp4", "--face", "f.png")
    assert job_options_from_args(args) == JobOptions()


@pytest.mark.parametrize(
    "argv",
    [
        ["render", "v.mp4", "--face", "f.png", "-o", "o.mp4", "--api", "http://h:8000", "--token", "T"],
        ["submit", "v.mp4", "--face", "f.png", "--api", "http://h:8000", "--token", "T", "--json"],
        *[
            [cmd, "JOB", "--json", "--api", "http://h", "--token", "T"]
            for cmd in ("status", "wait", "cancel", "retry", "logs", "audit")
        ],
        ["download", "JOB", "-o", "out.mp4", "--json"],
        ["list", "--json"],
        ["swap-image", "--face", "f.png", "t.png", "-o", "o.png", "--swapper", "classic"],
        ["api", "--host", "0.0.0.0", "--port", "8080"],
        ["worker", "--gpus", "all", "--per-gpu", "2", "--mps", "managed", "--queues", "gpu,cpu"],
        ["worker", "--gpus", "0,1"],
        ["worker", "--gpus", "none", "--queues", "cpu"],
        ["worker", "--unblock"],
        ["flower"],
        ["reconciler"],
        ["models", "fetch", "--store", "/tmp/store"],
        ["models", "list", "--store", "s3://bucket/models"],
        ["models", "verify"],
        [
            "models",
            "add",
            "inswapper_128.onnx",
            "/tmp/x.onnx",
            "--licence",
            "non-commercial",
            "--source",
            "u",
        ],
    ],
)
def test_every_documented_command_parses(argv: list[str]) -> None:
    args = parse(*argv)
    assert callable(args.handler)


def test_worker_options_parse_to_launcher_arguments() -> None:
    args = parse("worker", "--gpus", "0,1", "--per-gpu", "3", "--mps", "external", "--queues", "gpu,cpu")
    assert (args.gpus, args.per_gpu, args.mps, args.queues, args.unblock) == (
        "0,1",
        3,
        "external",
        ["gpu", "cpu"],
        False,
    )
    assert parse("worker").gpus == "all" and parse("worker").queues == ["gpu", "check"]


@pytest.mark.parametrize(
    "argv",
    [
        ["render", "v.mp4", "-o", "o.mp4"],  # --face missing
        ["render", "v.mp4", "--face", "f.png", "-o", "o.mp4", "--upscale", "3"],
        ["render", "v.mp4", "--face", "f.png", "-o", "o.mp4", "--swapper", "roop"],
        ["render", "v.mp4", "--face", "f.png", "-o", "o.mp4", "--start", "abc"],
        ["render", "v.mp4", "--face", "f.png", "-o", "o.mp4", "--chunk-frames", "0"],
        ["worker", "--gpus", "first"],
        ["worker", "--mps", "sometimes"],
        ["download", "JOB"],  # -o missing
        ["models"],
        ["nonsense"],
    ],
)
def test_invalid_command_lines_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2


def test_debug_is_accepted_before_and_after_the_subcommand() -> None:
    assert parse("--debug", "status", "J").debug is True
    assert parse("status", "J", "--debug").debug is True
    assert parse("status", "J").debug is False


@pytest.mark.parametrize(
    ("text", "seconds"), [("12", 12.0), ("1.5", 1.5), ("01:30", 90.0), ("1:02:03.5", 3723.5)]
)
def test_times_parse_as_seconds_or_clock(text: str, seconds: float) -> None:
    assert parse_time_s(text) == seconds


def test_flower_refuses_to_start_without_basic_auth() -> None:
    with pytest.raises(ConfigError, match="FACEFARM_FLOWER_BASIC_AUTH"):
        flower_env(Settings(flower_basic_auth=None), {})
    with pytest.raises(ConfigError):
        flower_env(Settings(flower_basic_auth="admin:"), {})


def test_flower_gets_auth_through_the_environment_not_argv() -> None:
    settings = Settings(flower_basic_auth="ops:s3cret", flower_port=5599)
    args = flower_args(settings, python="py")
    assert args == ["py", "-m", "celery", "-A", "dispatcher.celery_app", "flower", "--port=5599"]
    assert "s3cret" not in " ".join(args)
    env = flower_env(settings, {"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "FLOWER_BASIC_AUTH": "ops:s3cret",
        "FLOWER_TASKS_COLUMNS": FLOWER_TASKS_COLUMNS,
    }
    assert "args" in FLOWER_TASKS_COLUMNS.split(",")  # render tasks show job id and chunk index
    assert flower_env(settings, {"FLOWER_TASKS_COLUMNS": "name"})["FLOWER_TASKS_COLUMNS"] == "name"


def test_missing_input_is_one_clear_line_and_nonzero(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    face = tmp_path / "face.png"
    face.write_bytes(b"x")
    code = main(["render", str(tmp_path / "missing.mp4"), "--face", str(face), "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().splitlines() == [f"facefarm: error: VIDEO: no such file: {tmp_path / 'missing.mp4'}"]


def test_reference_selector_without_reference_is_refused_before_anything_starts(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    video, face = tmp_path / "v.mp4", tmp_path / "f.png"
    video.write_bytes(b"x")
    face.write_bytes(b"x")
    argv = [
        "render",
        str(video),
        "--face",
        str(face),
        "-o",
        str(tmp_path / "o.mp4"),
        "--face-selector",
        "reference",
    ]
    assert main(argv) == 1
    assert "--reference IMAGE" in capsys.readouterr().err


def test_client_commands_without_a_token_say_how_to_pass_one(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("FACEFARM_API_TOKEN", raising=False)
    from shared.settings import get_settings

    get_settings.cache_clear()
    assert main(["status", "JOB", "--api", "http://127.0.0.1:9"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "facefarm: error: no API token: pass --token T or set FACEFARM_API_TOKEN"
    )
