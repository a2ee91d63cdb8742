"""Build the demo's inputs from photos inside installed packages: a 3 s pan/zoom clip over
insightface's six-face group photo, plus a short hold on a face-free frame, with a tone as audio;
the source face is scikit-image's public-domain astronaut."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import cv2
import insightface
import numpy as np
from skimage import data


def build_inputs(out: Path, *, width: int = 480, seconds: float = 3.0) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    group = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    face_png = out / "face.png"
    cv2.imwrite(str(face_png), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    blank = out / "blank.png"
    cv2.imwrite(str(blank), np.full((270, 480, 3), 90, np.uint8))
    video = out / "input.mp4"
    frames = int(seconds * 25)
    zoom = f"zoompan=z='1+0.15*on/{frames}':x='iw/2-(iw/zoom/2)':y='ih/2-(ih/zoom/2)':d={frames}:s={width}x270:fps=25"
    subprocess.run(
        [
            "ffmpeg",
            "-y",
            "-v",
            "error",
            "-loop",
            "1",
            "-i",
            str(group),
            "-loop",
            "1",
            "-t",
            "0.4",
            "-i",
            str(blank),
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:duration={seconds + 0.4}",
            "-filter_complex",
            f"[0:v]{zoom},format=yuv420p,trim=duration={seconds}[a];"
            f"[1:v]scale={width}:270,fps=25,format=yuv420p[b];[a][b]concat=n=2:v=1:a=0[v]",
            "-map",
            "[v]",
            "-map",
            "2:a",
            "-c:v",
            "libx264",
            "-g",
            "50",
            "-c:a",
            "aac",
            "-shortest",
            str(video),
        ],
        check=True,
    )
    return video, face_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    args = parser.parse_args()
    video, face = build_inputs(args.out)
    print(f"demo inputs: {video} {face}")


if __name__ == "__main__":
    main()
