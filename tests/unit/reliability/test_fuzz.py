"""Fuzzing (hypothesis) of what untrusted input reaches: the probe parser and the API payloads.

Property: any input gives a parsed result or a FaceFarmError (permanent, one line), never another
exception. Example counts are fixed and derandomized so CI is repeatable; every crash found became
a regression example below (``@example``) and a fix in the product code.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dispatcher.routes import SubmitByUri, parse_options
from shared.errors import FaceFarmError
from shared.media import VideoInfo, parse_packets, parse_probe
from shared.schemas import JobOptions

FUZZ = settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["0/0", "1/0", "30000/1001", "N/A", "-1/25", "1e400", "nan", "", "90", "-90"]),
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _field(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(values, scalars)


streams = st.fixed_dictionaries(
    {},
    optional={
        "index": _field(st.integers(0, 4)),
        "codec_type": _field(st.sampled_from(["video", "audio", "subtitle", "data"])),
        "codec_name": _field(st.sampled_from(["h264", "hevc", "aac"])),
        "width": _field(st.integers(-5, 10000)),
        "height": _field(st.integers(-5, 10000)),
        "time_base": _field(st.sampled_from(["1/15360", "1/90000", "0/1", "1/0", "abc"])),
        "avg_frame_rate": _field(st.sampled_from(["15/1", "0/0", "30000/1001"])),
        "r_frame_rate": scalars,
        "nb_frames": scalars,
        "pix_fmt": _field(st.sampled_from(["yuv420p", "yuv420p10le", "yuvj420p", "gray16be"])),
        "bits_per_raw_sample": scalars,
        "color_transfer": _field(st.sampled_from(["smpte2084", "bt709", "arib-std-b67"])),
        "side_data_list": st.lists(
            st.dictionaries(st.sampled_from(["rotation", "side_data_type"]), scalars), max_size=2
        )
        | scalars,
        "tags": st.dictionaries(st.sampled_from(["rotate", "language"]), scalars) | scalars,
        "disposition": st.dictionaries(st.sampled_from(["attached_pic", "default"]), scalars) | scalars,
        "channels": scalars,
        "sample_rate": scalars,
        "start_pts": scalars,
    },
)
probe_json = st.fixed_dictionaries(
    {},
    optional={
        "streams": st.lists(streams, max_size=3) | json_values,
        "format": st.fixed_dictionaries(
            {}, optional={"format_name": scalars, "duration": scalars, "start_time": scalars}
        )
        | json_values,
    },
)
packet = st.fixed_dictionaries(
    {},
    optional={
        "pts": scalars.map(str),
        "dts": scalars.map(str),
        "duration": scalars.map(str),
        "flags": st.sampled_from(["K_", "__", "D_", "KD", ""]),
    },
)
VALID_STREAM = {
    "index": 0,
    "codec_type": "video",
    "codec_name": "h264",
    "width": 160,
    "height": 96,
    "time_base": "1/15360",
    "avg_frame_rate": "15/1",
    "pix_fmt": "yuv420p",
}


def _parse(data: Any, packets: Any) -> None:
    try:
        info = parse_probe(data, packets, source="fuzz.mp4")
    except FaceFarmError as exc:
        assert exc.permanent and "\n" not in str(exc)
        return
    assert isinstance(info, VideoInfo) and info.frame_count == len(info.frame_pts) > 0


@FUZZ
@given(probe_json, st.lists(packet, max_size=6))
@example(
    {"streams": [dict(VALID_STREAM, side_data_list=[{"rotation": "nan"}])]}, [{"pts": "0", "flags": "K_"}]
)
@example(
    {"streams": [dict(VALID_STREAM, side_data_list=[{"rotation": 1e400}])]}, [{"pts": "0", "flags": "K_"}]
)
@example({"streams": [dict(VALID_STREAM, index="x")]}, [{"pts": "0", "flags": "K_"}])
@example({"streams": [VALID_STREAM], "format": {"duration": "abc"}}, [{"pts": "0", "flags": "K_"}])
@example({"streams": [dict(VALID_STREAM, width="160")]}, [{"pts": "0", "flags": "K_"}, {"pts": "0"}])
@example({"streams": "not a list"}, [])
def test_probe_parser_returns_info_or_a_permanent_error(data: Any, packets: Any) -> None:
    _parse(data, packets)


@FUZZ
@given(st.text(max_size=400))
def test_packet_rows_parse_from_any_text(text: str) -> None:
    rows = parse_packets(text)
    assert all(isinstance(r, dict) for r in rows)
    _parse({"streams": [VALID_STREAM]}, rows)


options_fields = st.fixed_dictionaries(
    {},
    optional={name: json_values for name in JobOptions.model_fields} | {"unknown": json_values},
)


@FUZZ
@given(st.one_of(options_fields.map(json.dumps), json_values.map(json.dumps), st.text(max_size=200)))
@example('{"crf": 1e400}')
@example('{"upscale": "4"}')
@example("[]")
def test_multipart_options_field_parses_or_is_a_bad_input_error(text: str) -> None:
    try:
        options = parse_options(text)
    except FaceFarmError as exc:
        assert exc.permanent
        return
    assert isinstance(options, JobOptions)


@FUZZ
@given(
    st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "video_uri": json_values,
                "face_uri": json_values,
                "reference_uri": json_values,
                "options": options_fields | json_values,
            },
        ).map(json.dumps),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    )
)
def test_json_submit_body_parses_or_is_a_bad_input_error(body: str) -> None:
    from pydantic import ValidationError

    from dispatcher.http_errors import describe_validation
    from shared.errors import BadInputError

    try:  # exactly what the route does with the body
        try:
            SubmitByUri.model_validate_json(body)
        except ValidationError as exc:
            raise BadInputError(describe_validation(exc.errors())) from exc
    except FaceFarmError as exc:
        assert exc.permanent and str(exc)
