"""The one settings object: the only reader of the environment (prefix ``FACEFARM_``).

Every process (API, CPU worker, render worker, CLI, reconciler) builds it once with
``get_settings()`` and passes it down; nothing reads ``os.environ`` anywhere else.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError
from shared.faults import Fault, parse_faults

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """All of FaceFarm's configuration; env names are ``FACEFARM_<FIELD>`` in upper case."""

    model_config = SettingsConfigDict(env_prefix="FACEFARM_", extra="ignore", frozen=True)

    # --- broker / state -------------------------------------------------------------------
    redis_url: str = DEFAULT_REDIS_URL
    result_backend_url: str | None = None  # defaults to redis_url (db+1 is not assumed)
    require_redis_password: bool = False  # deployments set this; embedded mode does not

    # --- storage ---------------------------------------------------------------------------
    storage_url: str = "file:///var/lib/facefarm/storage"  # file:///dir or s3://bucket/prefix
    file_roots: list[Path] = Field(default_factory=list)  # extra roots file:// inputs may come from
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    presign_expiry_s: int = 6 * 3600

    # --- model store -----------------------------------------------------------------------
    model_store: str = str(Path.home() / ".cache" / "facefarm" / "models")  # dir or s3://...
    model_cache_dir: Path = Path.home() / ".cache" / "facefarm" / "models-synced"  # local copy of an s3 store

    # --- API / auth ------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # sha256(token) hex -> owner, e.g. '{"9f86d0...": "alice"}'
    api_tokens: dict[str, str] = Field(default_factory=dict)
    max_upload_bytes: int = 4 * 1024**3
    # client side (CLI / FarmClient): where the API is and the token to send
    api_url: str | None = None  # default http://{api_host}:{api_port}
    api_token: str | None = None

    # --- input limits (checked at plan time, before any GPU work) --------------------------
    max_duration_s: float = 4 * 3600
    max_width: int = 8192
    max_height: int = 8192
    max_frames: int = 1_000_000
    max_output_pixels: int = 7680 * 4320
    # decode every frame once at plan time (CPU) so corrupt data fails the job before any render;
    # off skips it for very long inputs (a render then fails at the damaged chunk instead)
    decode_check: bool = True
    decode_check_timeout_s: float = 1800.0

    # --- planning ----------------------------------------------------------------------------
    chunk_frames: int = 0  # 0 = derive from target_chunk_s
    target_chunk_s: float = 180.0  # GPU seconds of work per chunk
    warmup_frames: int = 8  # decoded before a chunk for tracking/smoothing, not output
    batch_frames: int = 8

    # --- reliability ---------------------------------------------------------------------------
    task_time_limit_s: int = 3600
    task_soft_time_limit_s: int = 3300
    visibility_timeout_s: int = 4 * 3600
    heartbeat_interval_s: float = 2.0
    stall_after_s: float = 60.0
    # a QUEUED job whose input check has not started after this long gets a line in its log saying
    # that no worker may be consuming the check queue (0: never)
    check_wait_warn_s: float = 120.0
    max_attempts: int = 3
    worker_block_after_failures: int = 5
    worker_block_ttl_s: int = 3600
    reconcile_interval_s: float = 10.0
    retention_inputs_s: int = 7 * 24 * 3600
    retention_outputs_s: int = 7 * 24 * 3600
    # TEST HOOK (shared.faults): e.g. "raise:chunk,index=1" — never set in production
    fault_injection: str = ""
    worker_seen_ttl_s: float = 15.0  # a render worker not seen for this long is not counted as live

    # --- render worker ---------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gpu_budget: str = "auto"  # auto | bytes (e.g. 2147483648) | 2GiB
    per_gpu: int = 1  # render clients (Celery worker processes) per GPU: deployments' --per-gpu
    budget_free_fraction: float = 0.9
    mps_pipe_dir: Path = Path("/tmp/nvidia-mps")
    mps_log_dir: Path = Path("/tmp/nvidia-mps-log")
    # this client's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT (e.g. "0=4096M"); the launcher sets both
    mps_mem_limit: str | None = None
    # this worker's CPUs (cpulist, e.g. 0-15): `facefarm worker` gives each GPU client its own block
    cpu_affinity: str | None = None
    unified_memory: bool = False
    # torch.compile the SR network on CUDA (~3x the eager net alone, but no faster inside the face-bound
    # render pipeline, bench/RESULTS.md); a worker's first chunk pays ~10 s of compile. CPU: ignored.
    sr_compile: bool = False
    # the SR nets' convs on CUDA: "cudnn" = torch's (compiled per sr_compile); "triton" = our fused
    # Triton kernels (conv + bias + PReLU + residual + pixel shuffle in one pass: less than half the GPU
    # time of cuDNN + torch's PReLU, which the face stage's kernels then get; ~20 s of autotuning on
    # a machine's first use, cached on disk; bench/RESULTS.md); "auto" = triton where it imports, else
    # cudnn; "triton-tma" = the same kernels loading tiles through TMA descriptors (Hopper or newer: 1.14x
    # "triton" on animevideov3 alone on an H200, same PSNR; opt-in: in the render worker its output bytes
    # varied between runs of the same settings, which the pointer loads' never did)
    sr_kernels: Literal["auto", "cudnn", "triton", "triton-tma"] = "auto"
    # MTCNN's first stage (integral image, pyramid, P-Net: ~600 small ops a 1080p batch) replayed from a
    # CUDA graph per batch shape, captured once per worker process: the face thread then launches it
    # once instead of op by op. Costs its intermediates' device memory for good (~1 GiB at 1080p x 8)
    detect_cuda_graph: bool = True
    # where the mesh swapper blends: "auto" = all faces of a batch at once on CUDA, cv2 on the CPU
    mesh_compositor: Literal["auto", "batched", "torch", "cv2"] = "auto"
    # detect (and smooth) the next batch's faces in a thread of its own while the current batch swaps,
    # each on its own CUDA stream; "off" runs both in the face-stage thread; "auto" = on with CUDA when
    # nothing blends in a pool (blend_threads 0): with the blend pool, detecting in the face thread (with
    # SR batch 8 and a 5 ms switch interval, the "auto" values below) was 12-18% faster on the H200
    # (bench/RESULTS.md, fifth session)
    detect_ahead: Literal["auto", "on", "off"] = "auto"
    # threads that blend swapped faces into frames (a swapper's stateless half, e.g. the mesh compositor)
    # while the face thread tracks the next batch: each on its own CUDA stream. 0 blends in the face
    # thread; "auto" = 2 with CUDA, 0 on the CPU (where torch's own threads already fill the cores)
    blend_threads: Literal["auto"] | Annotated[int, Field(ge=0, le=16)] = "auto"
    # most frames one SR call takes at once; "auto" = 8 with a blend pool, 2 without (bench/RESULTS.md:
    # 8 won with the pool on the H200; 2 won where the face thread blends: the H200 before the pool, and
    # the CPU path, which has no pool)
    sr_max_batch: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # the render process's sys.setswitchinterval; "auto" = Python's 5 ms with a blend pool, 1 ms without
    # (one face thread doing all the face work then waits less for the GIL between its torch ops)
    gil_switch_interval_ms: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto"
    encoder_threads: int = 2
    # x264 threads on slices of each frame instead of whole frames (EncoderSettings.sliced_threads): a
    # shorter flush at a chunk's end, but on the H200 host it cost 29% of the 4K encode rate and the
    # render worker lost 10-20% (bench/RESULTS.md, seventh session); for hosts where that differs
    encoder_sliced_threads: bool = False

    # --- flower / observability ------------------------------------------------------------
    flower_basic_auth: str | None = None  # "user:password"
    flower_port: int = 5555
    log_level: str = "INFO"

    # --- safety -------------------------------------------------------------------------------
    synthetic_label: str = "synthetic media: face-swapped with FaceFarm"
    environment: Literal["local", "production"] = "local"

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production":
            if not self.api_tokens:
                raise ConfigError("FACEFARM_API_TOKENS must be set in production")
            if not self.flower_basic_auth:
                raise ConfigError("FACEFARM_FLOWER_BASIC_AUTH must be set in production")
            if self.require_redis_password and "@" not in self.redis_url:
                raise ConfigError("FACEFARM_REDIS_URL must carry a password in production")
        if self.fault_injection and self.environment == "production":
            raise ConfigError("FACEFARM_FAULT_INJECTION is a test hook; it must not be set in production")
        parse_faults(self.fault_injection)  # a typo fails at start, not silently
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ConfigError("task_soft_time_limit_s must be below task_time_limit_s")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ConfigError("visibility_timeout_s must exceed task_time_limit_s")
        return self

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The parsed ``fault_injection`` (empty unless a test set it)."""
        return parse_faults(self.fault_injection)

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
