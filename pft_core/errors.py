"""Typed errors a user can meet, each with a message that says what to do.

Raised at the boundary (file, video, face, bundle, store, privacy budget), never a bare
traceback from deep inside torch or FFmpeg.
"""

from __future__ import annotations

from pathlib import Path


class PFTError(Exception):
    """Base class of every error this project raises on purpose."""


# --- video and faces ---------------------------------------------------------------------------
class VideoError(PFTError):
    """A video file could not be used; ``path`` names it and ``reason`` says why."""

    reason: str = "unusable video"

    def __init__(self, path: str | Path, detail: str = "") -> None:
        self.path = Path(path)
        self.detail = detail
        msg = f"{self.path}: {self.reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class EmptyVideoFileError(VideoError):
    reason = "the file is empty (0 bytes)"


class NotAVideoError(VideoError):
    reason = "not a video file FFmpeg can open"


class TruncatedVideoError(VideoError):
    reason = "the video is truncated or corrupt"


class NoFramesError(VideoError):
    reason = "the video has no decodable frames"


class ResolutionTooLargeError(VideoError):
    reason = "the video's resolution is larger than the configured limit"


class FrameRateError(VideoError):
    reason = "the video's frame rate is absurd"


class NoFaceError(VideoError):
    reason = "no face was found in any sampled frame"


class TooFewFacesError(PFTError):
    """Adaptation refused: too few usable face frames to learn from."""

    def __init__(self, found: int, needed: int, what: str = "adaptation") -> None:
        self.found = found
        self.needed = needed
        super().__init__(
            f"{what} needs at least {needed} usable face frames but found {found}; "
            "record a longer neutral video with the face clearly visible"
        )


# --- datasets ----------------------------------------------------------------------------------
class DatasetLayoutError(PFTError):
    """A dataset root does not have the layout its loader expects."""


# --- bundles, stores, weights ------------------------------------------------------------------
class BundleError(PFTError):
    """A model bundle could not be trusted or read."""


class BundleSignatureError(BundleError):
    """The bundle's signature does not verify against the trusted key."""


class BundleTamperedError(BundleError):
    """A file's digest differs from the manifest, or a file is missing."""


class BundleUnsignedFileError(BundleError):
    """The bundle holds a file the signed manifest does not list."""


class BundleRollbackError(BundleError):
    """The bundle's version is older than the one already trusted."""


class UnsafeWeightsError(PFTError):
    """A weights file is not plain safetensors/numpy data (e.g. it carries a pickle)."""


class StoreError(PFTError):
    """The on-device encrypted store failed."""


class StoreAuthenticationError(StoreError):
    """Decryption failed: the file is corrupted, foreign, or the key is wrong."""


class StoreRollbackError(StoreAuthenticationError):
    """Only generations older than the newest one written are left: an older copy was put in place."""


# --- privacy -----------------------------------------------------------------------------------
class PrivacyBudgetExceededError(PFTError):
    """A DP release would exceed the configured privacy budget; nothing was run."""


class LedgerIntegrityError(StoreError, PrivacyBudgetExceededError):
    """The privacy ledger is missing, damaged, rolled back or inconsistent: DP releases are refused
    (nothing was run) until it can be trusted; it is never reset."""


# --- video pipeline (added with pft.core.data) -------------------------------------------------
class DecodeTimeoutError(VideoError):
    reason = "decoding took longer than the configured timeout (the decoder was stopped)"


class TooFewFaceFramesError(VideoError):
    reason = "a face was found in too few frames"


class FaceAnnotationError(VideoError):
    reason = "the face annotation sidecar (<stem>.faces.json) is missing or malformed"


# --- model weights -----------------------------------------------------------------------------
class IncompatibleWeightsError(PFTError):
    """A weights file does not fit the model it is loaded into (keys or shapes differ)."""

    def __init__(self, path: str | Path, detail: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: weights do not fit the model ({detail})")


# --- client SDK --------------------------------------------------------------------------------
class PersonalStateMismatchError(StoreError):
    """The saved personal state was made with another model bundle than the one installed."""


class MissingExtraError(PFTError):
    """A feature needs an optional dependency this install lacks; the message names the extra to
    install (e.g. ``pip install 'sfda-pft[dp]'`` for DP-SGD)."""

    def __init__(self, feature: str, module: str, extra: str) -> None:
        self.feature, self.module, self.extra = feature, module, extra
        install = f"pip install 'sfda-pft[{extra}]'"
        super().__init__(f"{feature} needs {module}, which this install lacks: {install}")


# --- federated translator prior ----------------------------------------------------------------
class InvalidPriorUpdateError(PFTError):
    """A translator update (or the aggregate of updates) is not finite or does not match T's tensors."""


class SecureAggregationHaltedError(PFTError):
    """Secure aggregation of the prior stopped (too few survivors, no participant, a bad aggregate);
    no new bundle was published. The message names the stage and the counts."""


# --- configuration and resources -----------------------------------------------------------------
class ResourceError(PFTError, ValueError):
    """A device, thread or CPU count, or a cache folder the user asked for that this machine does
    not have (checked before any work)."""


class ConfigFileError(PFTError):
    """A configuration file is missing, torn, or not a mapping of fields."""


class FlowerRuntimeError(PFTError):
    """A Flower run through ``flwr run`` did not complete: the managed SuperLink did not start in
    time, ``flwr`` refused the run, or the run failed or ran past its time limit (the message says
    which, with the end of the log)."""
