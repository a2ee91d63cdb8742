"""Frames in and out of video files with PyAV only (the GPU machine has no ffmpeg binary).

``decode_range`` yields upright RGB batches of one chunk (plus warm-up frames) with their source
timestamps; ``open_encoder`` writes them back with the job's fixed encoder settings so chunks can
be joined by stream copy.
"""

from worker.frames.decode import FrameBatch, decode_range
from worker.frames.encode import ChunkEncoder, count_frames, open_encoder

__all__ = ["ChunkEncoder", "FrameBatch", "count_frames", "decode_range", "open_encoder"]
