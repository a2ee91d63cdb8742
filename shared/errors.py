"""The one error tree of FaceFarm.

Foreign errors (redis, botocore, torch OOM, ffmpeg exit codes, PyAV) are translated once, at the
boundary where they happen, and raised ``from exc``. Tasks retry by class, never by message text::

    FaceFarmError                      root; ``str(err)`` is one line a user can act on
    ├── PermanentError                 retrying cannot help: the job ends FAILED with this reason
    │   ├── BadInputError              the user's video, image or options are unusable
    │   │   ├── InvalidVideoError      not a video, truncated, no video stream, undecodable
    │   │   ├── InvalidImageError      not an image, empty, unreadable
    │   │   ├── NoFaceError            no (usable) face where one is required
    │   │   ├── LimitExceededError     over size/duration/resolution/codec limits
    │   │   └── HdrRefusedError        HDR input without ``--hdr tonemap``
    │   ├── UnknownModelError          a model name that is not in the registry
    │   ├── ModelStoreError            a weight file missing or corrupt in the model store
    │   ├── StorageAccessError         a URI outside the configured roots, a bad S3 key
    │   ├── NotFoundError              no such job (or not yours)
    │   ├── AuthError                  missing or wrong API token
    │   ├── ConfigError                unsafe or contradictory settings
    │   ├── FrameTooLargeError         one frame at the smallest tile does not fit the GPU budget
    │   └── AttemptsExhaustedError     a chunk failed on its last allowed attempt
    ├── RetryableError                 transient: retry the step or the task
    │   ├── GpuOutOfMemoryError        CUDA OOM (the runtime shrinks tiles/batches first)
    │   ├── BrokerUnavailableError     Redis/broker not reachable
    │   ├── ApiUnavailableError        the FaceFarm HTTP API not reachable (client side)
    │   ├── StorageUnavailableError    transient storage I/O
    │   └── ExternalToolError          ffmpeg/ffprobe failed in a way that may be transient
    ├── StaleAttemptError              this attempt lost its lease: another attempt owns the chunk
    │   └── DuplicateDeliveryError     a duplicate message while a live attempt renders the chunk
    ├── AvoidWorkerError               this worker failed the chunk before; another one should take it
    └── JobCancelledError              the job's cancel flag is set: stop quietly
"""

from __future__ import annotations

from typing import Any


class FaceFarmError(Exception):
    """Root of every error FaceFarm raises on purpose; carries context as attributes."""

    permanent: bool = False

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message

    @property
    def kind(self) -> str:
        """The class name, stored in the job record so clients can branch without parsing text."""
        return type(self).__name__


class PermanentError(FaceFarmError):
    """Retrying cannot help; the job ends FAILED with this message."""

    permanent = True


class BadInputError(PermanentError):
    """The user's inputs or options are unusable."""


class InvalidVideoError(BadInputError):
    """The video is not a readable video (no stream, truncated, wrong format)."""


class InvalidImageError(BadInputError):
    """The image cannot be read as an image."""


class NoFaceError(BadInputError):
    """No usable face was found where one is required."""


class LimitExceededError(BadInputError):
    """The input or requested output exceeds a configured or codec limit."""


class HdrRefusedError(BadInputError):
    """HDR input was given without opting into tone mapping."""


class UnknownModelError(PermanentError):
    """A model name that the registry does not know."""


class ModelStoreError(PermanentError):
    """A weight file is missing or does not match the manifest."""


class StorageAccessError(PermanentError):
    """A URI is outside the configured roots or is malformed."""


class NotFoundError(PermanentError):
    """The job (or object) does not exist, or belongs to someone else."""


class AuthError(PermanentError):
    """The API token is missing or wrong."""


class ConfigError(PermanentError):
    """Settings are unsafe or contradictory."""


class FrameTooLargeError(PermanentError):
    """A single frame at the smallest tile does not fit the GPU memory budget."""


class AttemptsExhaustedError(PermanentError):
    """A chunk used up its attempts."""


class RetryableError(FaceFarmError):
    """A transient failure; the step or task may be retried."""


class GpuOutOfMemoryError(RetryableError):
    """CUDA ran out of memory; the runtime retries with smaller tiles/batches first."""


class BrokerUnavailableError(RetryableError):
    """The broker / state store cannot be reached."""


class ApiUnavailableError(RetryableError):
    """The FaceFarm HTTP API cannot be reached (refused, timed out, DNS)."""


class StorageUnavailableError(RetryableError):
    """Storage I/O failed transiently."""


class ExternalToolError(RetryableError):
    """An external tool (ffmpeg, ffprobe) failed; ``stderr_tail`` says how."""


class StaleAttemptError(FaceFarmError):
    """This attempt no longer owns its chunk (fenced out by a newer attempt)."""


class DuplicateDeliveryError(StaleAttemptError):
    """A second message for a chunk that a live attempt is rendering; it is dropped."""


class AvoidWorkerError(FaceFarmError):
    """This worker already failed the chunk and another live worker has not: hand it on."""


class JobCancelledError(FaceFarmError):
    """The job was cancelled; work stops between batches."""


def error_from_kind(kind: str, message: str) -> FaceFarmError:
    """Rebuild an error from its stored class name (job records, HTTP bodies)."""
    cls = _BY_NAME.get(kind, FaceFarmError)
    return cls(message)


_BY_NAME: dict[str, type[FaceFarmError]] = {}


def _collect(cls: type[FaceFarmError]) -> None:
    _BY_NAME[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(FaceFarmError)
