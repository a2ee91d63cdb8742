"""The same farm on S3 (moto's server): inputs uploaded to the bucket, render workers decode presigned URLs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dispatcher import service
from shared.schemas import JobOptions, JobStatus
from shared.storage import S3Storage
from tests.integration.farm.conftest import Farm
from tests.support.farm import eventually
from tests.support.media import count_frames

pytestmark = pytest.mark.integration


def test_job_on_s3_completes_from_presigned_urls(
    s3_farm: Farm, multiface_video: Path, face_image: Path
) -> None:
    storage = s3_farm.ctx.storage
    assert isinstance(storage, S3Storage)
    with multiface_video.open("rb") as video, face_image.open("rb") as face:
        view = service.submit_job(
            s3_farm.ctx,
            owner="alice",
            video=video,
            video_name="party.mp4",
            face=face,
            face_name="hanks.png",
            options=JobOptions(swapper="classic", upscale=1),
        )
    job = s3_farm.ctx.store.get_job(view.job_id)
    assert job.video_uri.startswith("s3://farm-test/facefarm/jobs/")
    assert storage.local_path_or_url(job.video_uri).startswith("http://127.0.0.1:")  # what workers decode

    seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        seen.append(service.get_job(s3_farm.ctx, "alice", view.job_id))
        if seen[-1].status.finished:
            break
        time.sleep(0.2)
    final = seen[-1]
    assert final.status is JobStatus.COMPLETED, (
        final,
        service.job_logs(s3_farm.ctx, "alice", view.job_id),
        s3_farm.worker_logs(),
    )
    progress = [v.frames_done for v in seen]
    assert progress == sorted(progress) and final.frames_done == 45 and final.chunks_total == 3

    url = service.output_location(s3_farm.ctx, "alice", view.job_id)
    assert url.startswith("http://") and "Signature" in url
    assert count_frames(url) == 45
    assert storage.exists(f"jobs/{view.job_id}/output.mp4")
    first_chunk = f"jobs/{view.job_id}/chunks/00000/output.mp4"
    assert eventually(lambda: not storage.exists(first_chunk))  # dropped after COMPLETED
