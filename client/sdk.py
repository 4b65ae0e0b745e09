"""The on-device SDK a health app embeds: verify a bundle, enroll a person, predict, save, export.

One implementation of bundle verification, the encrypted personal store and adaptation, also used
by the Flower ClientApp::

    p = Personalizer.from_bundle("bundle/", "bundle-signing.pub", state_dir="state/")
    report = p.enroll(["neutral_1.mp4", "neutral_2.mp4"])        # adapts T on the device
    p.predict("clip.mp4").label                                  # C(T(F(x))) per frame, smoothed
    p.save(StoreKey.from_passphrase(passphrase), owner="alice")  # AES-GCM, atomic
    p = Personalizer.load("state/", "bundle-signing.pub", key, owner="alice")
    p.export("model.onnx")                                       # F, T, C fused, style codes baked in

A node that already has F's features of the person's frames (the ClientApp, reading its
feature cache) enrolls with :meth:`Personalizer.enroll_features` and scores with
:meth:`Personalizer.feature_logits`: the same adaptation, privacy ledger, pairing fallback and
personal state as the video path.

Layout of ``state_dir`` (the SDK writes nowhere else; exports go where the caller says): see
:mod:`pft.client.personal_state` (``bundles/``: one folder per installed bundle, the newest signed
version current; ``personal.store``: the encrypted personal state; ``privacy_ledger.store``: the
encrypted, owner-bound privacy ledger).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field
from torch import Tensor

from pft.client.export import ExportFormat, InputDType, PersonalizedModel, export_model
from pft.client.ledger import LEDGER_FILE, PrivacyBudget, PrivacyLedger, longer_history
from pft.client.personal_state import BUNDLES_DIR, STATE_FILE, PersonalState, personal_store
from pft.client.store import EncryptedStore, StoreKey
from pft.core.adaptation import AdaptResult
from pft.core.bundle import Bundle, load_bundle
from pft.core.config import FrozenConfig
from pft.core.data import (
    AnnotatedFaceDetector,
    AnnotatedLandmarkDetector,
    FaceCropConfig,
    FaceDetector,
    LandmarkDetector,
    Rejection,
    VideoConfig,
    VideoDecoder,
    VideoRecord,
    crop_face,
    extract_face_clip,
    geometry_descriptor,
    process_videos,
)
from pft.core.data.detectors import DetectorName, make_detector
from pft.core.data.faces import sidecar_path
from pft.core.data.pipeline import BatchReport, FaceClip
from pft.core.domain import OOD_WARN, TrainingDomain, domain_warning, ood_score
from pft.core.errors import (
    BundleTamperedError,
    LedgerIntegrityError,
    MissingExtraError,
    NoFaceError,
    PFTError,
    StoreError,
    TooFewFacesError,
)
from pft.core.models import Translator, preprocess
from pft.core.pairing import Strategy
from pft.core.personalize import Personalization, PersonalizeConfig, SourceModel, personalize
from pft.core.privacy import plan_release
from pft.core.signing import TrustedBundleCache, bundle_digest, key_id, load_public_key, verify_bundle
from pft.core.training import SourceStyles, extract_features

__all__ = [
    "STATE_FILE",
    "ClientConfig",
    "EnrollmentReport",
    "Personalizer",
    "Prediction",
    "ProgressCallback",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages ``faces`` (per video), ``features`` and ``adapt``."""

PublicKeyLike = Ed25519PublicKey | str | Path


class ClientConfig(FrozenConfig):
    """How the SDK decodes, detects, adapts and smooths.

    Attributes
    ----------
    video:
        Decoding limits and sampling; by default at most 64 frames per video, spread evenly, so
        a 10-second clip enrolls in seconds on a phone-class CPU.
    crop:
        Face crop settings; ``None`` crops at the bundle's ``image_size``.
    personalize:
        Stage-3 settings (``min_frames``: fewest usable face frames enrollment accepts).
    detector:
        ``auto``: a video with a ``<stem>.faces.json`` sidecar uses the annotated detectors (the
        synthetic cohort), any other video the default real-face detector (dlib's HOG detector
        with 68-point landmarks when the ``landmarks`` extra is installed, else the Haar
        cascade; see ``pft.core.data.detectors``); ``dlib-hog``, ``dlib-cnn``, ``mtcnn``,
        ``haar`` / ``annotated`` force one.
    smoothing:
        How per-frame probabilities become one per-video label: ``mean`` (average of the frames'
        probabilities) or ``ema`` (exponential moving average in frame order,
        ``e_1 = p_1, e_t = ema_alpha * p_t + (1 - ema_alpha) * e_{t-1}``; the last value is used).
    ema_alpha:
        Weight of the newest frame for ``ema``.
    prestart_decoder:
        Start the isolated decoder process in the background as soon as the ``Personalizer`` is
        made (when ``video.isolate``), so its start-up overlaps loading the bundle instead of
        delaying the first ``enroll`` or video ``predict``. ``False`` starts it on first use.
    """

    video: VideoConfig = VideoConfig(max_frames=64)
    crop: FaceCropConfig | None = None
    personalize: PersonalizeConfig = PersonalizeConfig()
    detector: DetectorName = "auto"
    smoothing: Literal["mean", "ema"] = "mean"
    ema_alpha: float = Field(0.3, gt=0.0, le=1.0)
    privacy_budget: PrivacyBudget = PrivacyBudget()  # DP budget of the ledger (personalize.dp set)
    prestart_decoder: bool = True


@dataclass(frozen=True)
class EnrollmentReport:
    """What :meth:`Personalizer.enroll` did; ``len(videos_used) + len(videos_rejected) == videos_given``.

    Attributes
    ----------
    videos_given:
        How many videos were passed.
    videos_used:
        The videos that gave face frames.
    videos_rejected:
        One :class:`~pft.core.data.Rejection` (path, error type, reason) per unusable video.
    frames_used:
        Face frames adaptation learned from.
    iterations, converged, adapt_seconds:
        The adaptation run.
    seconds:
        Wall time of the whole enrollment (decode, detect, features, adapt).
    reference_subject:
        The source subject whose style the person is translated to.
    pairing:
        The pairing strategy used (``landmark`` falls back to ``random`` without landmarks).
    privacy:
        The DP release (epsilon, delta, privacy unit, accountant...) when DP was on, else None.
    pairing_fallback:
        Why the bundle's ``landmark`` pairing fell back to ``random`` (no frame had landmarks; the
        reference subject is then drawn at random, not matched); ``None`` when it did not.
    ood_score:
        How far the person's neutral style lies from the source subjects'
        (:func:`pft.core.domain.ood_score`: about 1 in distribution, above 3 out of it).
    warnings:
        What the user should know: a synthetic-domain bundle on real video, an out-of-distribution
        person, a pairing fallback.
    """

    videos_given: int
    videos_used: tuple[Path, ...]
    videos_rejected: tuple[Rejection, ...]
    frames_used: int
    iterations: int
    converged: bool
    adapt_seconds: float
    seconds: float
    reference_subject: str
    pairing: str
    privacy: dict[str, Any] | None = None  # the DP release (epsilon, delta, unit...) when DP was on
    pairing_fallback: str | None = None
    ood_score: float | None = None
    warnings: tuple[str, ...] = ()

    def reconciles(self) -> bool:
        """Whether every given video is either used or rejected, exactly once."""
        return len(self.videos_used) + len(self.videos_rejected) == self.videos_given


@dataclass(frozen=True)
class Prediction:
    """Per-frame class probabilities and the smoothed per-video label.

    Attributes
    ----------
    class_names:
        Names of the K classes.
    probabilities:
        float32 ``(N, K)``, one row per frame with a face.
    frame_indices:
        int64 ``(N,)``: which input frame (or decoded video frame) each row is.
    smoothed:
        float32 ``(K,)``: the per-video probabilities after smoothing (see ``ClientConfig``).
    smoothing:
        ``mean`` or ``ema``.
    personalized:
        Whether the person's translator was used (after enrollment) or the source model.
    frames_given:
        How many frames were looked at (sampled from a video, or passed in).
    warnings:
        E.g. a synthetic-domain bundle applied to a real video (see ``pft.core.domain``).
    """

    class_names: tuple[str, ...]
    probabilities: np.ndarray
    frame_indices: np.ndarray
    smoothed: np.ndarray
    smoothing: str
    personalized: bool
    frames_given: int
    warnings: tuple[str, ...] = ()

    @property
    def label_index(self) -> int:
        """Index of the smoothed label."""
        return int(np.argmax(self.smoothed))

    @property
    def label(self) -> str:
        """The smoothed per-video label."""
        return self.class_names[self.label_index]

    @property
    def frame_labels(self) -> list[str]:
        """The most probable class of each frame."""
        return [self.class_names[i] for i in self.probabilities.argmax(axis=1)]


def _public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    return key if isinstance(key, Ed25519PublicKey) else load_public_key(key)


def smooth_probabilities(probabilities: np.ndarray, smoothing: str, alpha: float) -> np.ndarray:
    """One probability vector (K,) from per-frame probabilities (N, K): mean, or the EMA's last value."""
    if len(probabilities) == 0:
        raise ValueError("no frames to smooth")
    if smoothing == "mean":
        return np.asarray(probabilities.mean(axis=0), dtype=np.float32)
    ema = probabilities[0].astype(np.float64)
    for row in probabilities[1:]:
        ema = alpha * row + (1.0 - alpha) * ema
    return ema.astype(np.float32)


@dataclass(frozen=True)
class _Enrollment:
    """What an enrollment brings to stage 3 beside the frames, and where they came from (for the
    report): clip and time index of each frame, the person's mean landmark descriptor, when the
    enrollment started, and the videos given, used and rejected (none for crops or features)."""

    video_ids: Tensor | None
    time_index: Tensor | None
    descriptor: np.ndarray | None
    started: float
    videos_given: int = 0
    used: tuple[Path, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    real_video: bool = False


def _mean_descriptor(clips: Sequence[FaceClip]) -> np.ndarray | None:
    """The mean landmark geometry descriptor over every frame with landmarks (None without any)."""
    rows: list[np.ndarray] = []
    for clip in clips:
        if clip.landmarks is None:
            continue
        for k, points in enumerate(clip.landmarks):
            if np.isnan(points).any():
                continue
            pose = None if clip.poses is None or np.isnan(clip.poses[k]).any() else clip.poses[k]
            try:
                rows.append(geometry_descriptor(points, pose))
            except ValueError:
                continue
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return np.mean(np.stack(rows), axis=0)


def _contain_torch_cache(state_dir: Path) -> None:
    """Keep torch's import-time cache folder inside ``state_dir`` (docs/reliability.md case 14).

    The first optimiser step imports ``torch._dynamo``, which creates an (empty) inductor cache
    folder, by default ``$TMPDIR/torchinductor_<user>``. If the SDK is the first to import it,
    point that folder into ``state_dir/.torch-cache`` for the import only (the environment is
    restored; an explicit ``TORCHINDUCTOR_CACHE_DIR`` is respected).
    """
    if "torch._dynamo" in sys.modules or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(state_dir / ".torch-cache")
    try:
        importlib.import_module("torch._dynamo")
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def _started_decoder(config: ClientConfig) -> VideoDecoder | None:
    """A decoder whose worker is starting in the background, if ``config`` wants one now."""
    if not (config.video.isolate and config.prestart_decoder):
        return None
    decoder = VideoDecoder()
    decoder.start()
    return decoder


@contextlib.contextmanager
def _prestarted_decoder(config: ClientConfig | None) -> Iterator[VideoDecoder | None]:
    """:func:`_started_decoder` for the span of verifying and loading a bundle.

    Closed if the block raises (a refused bundle leaves no process behind); otherwise the new
    ``Personalizer`` owns it.
    """
    decoder = _started_decoder(config or ClientConfig())
    try:
        yield decoder
    except BaseException:
        if decoder is not None:
            decoder.close()
        raise


class Personalizer:
    """A person's expression model on the device: the verified bundle and, once enrolled, their T.

    Build one with :meth:`from_bundle` (a received bundle), :meth:`from_installed` (the bundle a
    ``state_dir`` already trusts) or :meth:`load` (the installed bundle and the saved personal
    state). Call :meth:`close` (or use it as a context manager) to stop the decoder process.
    ``decoder`` (optional) is a :class:`~pft.core.data.VideoDecoder` the new object takes over
    and closes; by default one is made and started in the background (``config.prestart_decoder``).

    Raises
    ------
    MissingExtraError
        ``config.personalize.dp`` is set but Opacus (the ``dp`` extra) is not installed.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        config: ClientConfig | None = None,
        state_dir: str | Path | None = None,
        trusted_public_key: Ed25519PublicKey | None = None,
        key: StoreKey | None = None,
        owner: str | None = None,
        detector: FaceDetector | None = None,
        landmarker: LandmarkDetector | None = None,
        decoder: VideoDecoder | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        if self.config.personalize.dp is not None and importlib.util.find_spec("opacus") is None:
            if decoder is not None:
                decoder.close()
            raise MissingExtraError("DP-SGD adaptation (personalize.dp)", "Opacus", "dp")
        self.bundle = bundle
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.trusted_public_key = trusted_public_key
        self.bundle_digest = bundle_digest(bundle.manifest)
        self.crop_config = self.config.crop or FaceCropConfig(size=bundle.model_config.image_size)
        self.personalization: Personalization | None = None
        # DP releases (pft.client.ledger): with a state_dir, an encrypted ledger beside the store
        self.ledger = self._open_ledger(key, owner)
        self.enrollment: dict[str, Any] = {}
        self.recovered_from_backup = False
        self._key = key
        self._owner = owner
        self._detector = detector
        self._landmarker = landmarker
        self._real: tuple[FaceDetector, LandmarkDetector | None] | None = None
        # owned: close() stops it
        self._decoder: VideoDecoder | None = decoder if decoder is not None else _started_decoder(self.config)
        styles = SourceStyles.from_tensors(bundle.source_styles)
        pairing: Strategy = bundle.extra.get("pairing", "cosine")
        self.source_model = SourceModel(
            bundle.classifier,
            bundle.translator,
            bundle.normalizer,
            styles,
            {k: np.asarray(v) for k, v in bundle.descriptors.items()},
            pairing,
        )

    def _open_ledger(self, key: StoreKey | None, owner: str | None) -> PrivacyLedger:
        """The device's privacy ledger: in memory without a state_dir; else encrypted with the
        person's key (without a key, DP enrollment is refused: there is nowhere safe to record it)."""
        budget = self.config.privacy_budget
        if self.state_dir is None:
            return PrivacyLedger(budget)
        if key is None or not owner:
            return PrivacyLedger.locked(
                budget,
                "DP enrollment on a device records the release in the person's encrypted privacy "
                "ledger, which needs the store key and owner: pass key= and owner= to "
                "Personalizer.from_bundle, from_installed or load",
            )
        return PrivacyLedger.open(
            self.state_dir / LEDGER_FILE,
            budget,
            key=key,
            owner=owner,
            expect_existing=self._store(key).exists(),
        )

    # construction ----------------------------------------------------------------------------
    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        trusted_public_key: PublicKeyLike,
        *,
        state_dir: str | Path | None = None,
        min_version: int | None = None,
        config: ClientConfig | None = None,
        key: StoreKey | None = None,
        owner: str | None = None,
        detector: FaceDetector | None = None,
        landmarker: LandmarkDetector | None = None,
    ) -> Personalizer:
        """Verify a received bundle's signature and files, then load it.

        With ``state_dir`` the bundle is installed into ``state_dir/bundles`` (copied, verified
        again, made current atomically); a refused bundle leaves the installed one current and
        loadable with :meth:`from_installed`. Rollback protection compares with the installed
        version, and with ``min_version`` when given.

        Parameters
        ----------
        path:
            The bundle folder.
        trusted_public_key:
            The publisher's Ed25519 key (object or PEM file).
        state_dir:
            The device's state folder (optional; needed for :meth:`save`).
        min_version:
            Refuse bundles older than this version.
        config:
            SDK settings.
        key, owner:
            The store key and user id :meth:`save` will use (can also be given to ``save``).
        detector, landmarker:
            Custom face and landmark detectors for every video (default: see ``config.detector``).

        Raises
        ------
        BundleSignatureError, BundleTamperedError, BundleUnsignedFileError, BundleRollbackError
            The bundle was refused (nothing installed).
        UnsafeWeightsError
            A weights file is not plain safetensors (e.g. a pickle); nothing was unpickled.
        """
        public_key = _public_key(trusted_public_key)
        with _prestarted_decoder(config) as decoder:
            if state_dir is None:
                bundle = load_bundle(path, verify_bundle(path, public_key, min_version=min_version))
            else:
                # The cache runs the full load on its staged copy BEFORE the bundle becomes current:
                # a signed bundle whose weights are unreadable (a pickle, NaN, a wrong dtype) never
                # replaces the device's bundle. Keep that load instead of loading twice.
                loaded: list[Bundle] = []
                cache = TrustedBundleCache(
                    Path(state_dir) / BUNDLES_DIR,
                    public_key,
                    validator=lambda folder, manifest: loaded.append(load_bundle(folder, manifest)),
                )
                if min_version is not None:
                    verify_bundle(path, public_key, min_version=min_version)
                folder = cache.install(path)
                _, installed = cache.load_current()
                bundle = loaded[0] if loaded else load_bundle(folder, installed)
                if bundle_digest(installed) != bundle_digest(bundle.manifest):
                    raise BundleTamperedError(f"{path}: the bundle changed while it was being installed")
                bundle.folder = folder
        return cls(
            bundle,
            config=config,
            state_dir=state_dir,
            trusted_public_key=public_key,
            key=key,
            owner=owner,
            detector=detector,
            landmarker=landmarker,
            decoder=decoder,
        )

    @classmethod
    def from_installed(
        cls,
        state_dir: str | Path,
        trusted_public_key: PublicKeyLike,
        *,
        config: ClientConfig | None = None,
        key: StoreKey | None = None,
        owner: str | None = None,
        detector: FaceDetector | None = None,
        landmarker: LandmarkDetector | None = None,
    ) -> Personalizer:
        """The bundle currently installed in ``state_dir`` (verified again), not enrolled.

        ``key`` and ``owner`` open the person's privacy ledger (needed for DP enrollment) and are
        what :meth:`save` uses.

        Raises
        ------
        BundleError
            Nothing is installed, or the installed copy no longer verifies.
        """
        public_key = _public_key(trusted_public_key)
        with _prestarted_decoder(config) as decoder:
            folder, manifest = TrustedBundleCache(Path(state_dir) / BUNDLES_DIR, public_key).load_current()
            bundle = load_bundle(folder, manifest)
        return cls(
            bundle,
            config=config,
            state_dir=state_dir,
            trusted_public_key=public_key,
            key=key,
            owner=owner,
            detector=detector,
            landmarker=landmarker,
            decoder=decoder,
        )

    @classmethod
    def load(
        cls,
        state_dir: str | Path,
        trusted_public_key: PublicKeyLike,
        key: StoreKey,
        *,
        owner: str,
        config: ClientConfig | None = None,
        detector: FaceDetector | None = None,
        landmarker: LandmarkDetector | None = None,
    ) -> Personalizer:
        """The installed bundle and the person's saved state (translator, style codes, ledger).

        When the current store file fails to authenticate and ``personal.store.prev`` does, the
        previous copy is used and ``recovered_from_backup`` is set (a warning is logged).

        Raises
        ------
        StoreAuthenticationError
            Neither generation decrypts (corrupted, another owner's, or the wrong key).
        PersonalStateMismatchError
            The state was made with another bundle than the installed one (enroll again).
        BundleError
            No bundle is installed, or it no longer verifies.
        """
        p = cls.from_installed(
            state_dir,
            trusted_public_key,
            config=config,
            key=key,
            owner=owner,
            detector=detector,
            landmarker=landmarker,
        )
        read = p._store(key).read(owner=owner)
        p._restore(read.payload, str(read.source))
        p.recovered_from_backup = read.recovered_from_backup
        return p

    # lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the video decoder's worker process (if one was started)."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def __enter__(self) -> Personalizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def domain(self) -> TrainingDomain:
        """What the bundle's model was trained on (``unknown`` for bundles that do not say)."""
        return TrainingDomain.from_extra(self.bundle.extra)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The bundle's class names."""
        return tuple(self.bundle.class_names)

    @property
    def privacy_ledger(self) -> list[dict[str, Any]]:
        """The DP releases recorded on this device (see :mod:`pft.client.ledger`)."""
        return self.ledger.as_list()

    @property
    def enrolled(self) -> bool:
        """Whether a personal translator is in use."""
        return self.personalization is not None

    def info(self) -> dict[str, Any]:
        """What is installed and enrolled (no personal data beyond the reference subject's id)."""
        out: dict[str, Any] = {
            "bundle_version": self.bundle.bundle_version,
            "bundle_digest": self.bundle_digest,
            "class_names": list(self.class_names),
            "image_size": self.bundle.model_config.image_size,
            "pairing": self.source_model.pairing,
            "domain": self.domain.as_json(),
            "enrolled": self.enrolled,
            "privacy_releases": len(self.privacy_ledger),
        }
        if self.ledger.problem is not None:
            out["privacy_ledger_problem"] = self.ledger.problem
        if self.trusted_public_key is not None:
            out["key_id"] = key_id(self.trusted_public_key)
        if self.personalization is not None:
            out["reference_subject"] = self.personalization.reference_subject
            out["enrollment"] = dict(self.enrollment)
        return out

    # faces -----------------------------------------------------------------------------------
    def _video_decoder(self) -> VideoDecoder:
        if self._decoder is None:
            self._decoder = VideoDecoder()
        return self._decoder

    def _real_detectors(self) -> tuple[FaceDetector, LandmarkDetector | None]:
        """The detector (and landmarks) for real video: ``config.detector``, made once."""
        if self._real is None:
            name = "auto" if self.config.detector == "annotated" else self.config.detector
            self._real = make_detector(name)
        return self._real

    def _is_real(self, video: Path) -> bool:
        """Whether ``video`` goes through a real-face detector (no renderer sidecar is used)."""
        return not isinstance(self._detectors_for(video)[0], AnnotatedFaceDetector)

    def _detectors_for(self, video: Path) -> tuple[FaceDetector, LandmarkDetector | None]:
        if self._detector is not None:
            return self._detector, self._landmarker
        annotated = self.config.detector == "annotated" or (
            self.config.detector == "auto" and sidecar_path(video).is_file()
        )
        if annotated:
            return AnnotatedFaceDetector(), self._landmarker or AnnotatedLandmarkDetector()
        detector, landmarker = self._real_detectors()
        return detector, self._landmarker or landmarker

    def _face_clips(self, videos: Sequence[Path], progress: ProgressCallback | None) -> BatchReport:
        """Decode and crop every video with its detector; a bad video is a rejection, never fatal."""
        groups: dict[str, list[int]] = {}
        detectors: dict[str, tuple[FaceDetector, LandmarkDetector | None]] = {}
        for i, video in enumerate(videos):
            pair = self._detectors_for(video)
            name = "annotated" if isinstance(pair[0], AnnotatedFaceDetector) else f"detector-{id(pair[0])}"
            detectors.setdefault(name, pair)
            groups.setdefault(name, []).append(i)
        by_index: dict[int, FaceClip | Rejection] = {}
        done = 0
        for ident, members in groups.items():
            detector, landmarker = detectors[ident]
            records = [VideoRecord(path=videos[i], subject="me") for i in members]

            def step(_d: int, _n: int, _p: Path) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress("faces", done, len(videos))

            report = process_videos(
                records,
                self.config.video,
                self.crop_config,
                detector,
                landmarker,
                decoder=self._video_decoder() if self.config.video.isolate else None,
                progress=step,
            )
            clips = {c.record.path: c for c in report.clips}
            rejections = {r.path: r for r in report.rejected}
            for i in members:
                by_index[i] = clips.get(videos[i]) or rejections[videos[i]]
        merged = BatchReport(given=len(videos))
        for i in range(len(videos)):
            item = by_index[i]
            if isinstance(item, Rejection):
                merged.rejected.append(item)
            else:
                merged.clips.append(item)
        return merged

    # enrollment ------------------------------------------------------------------------------
    def enroll(
        self, neutral_videos: Iterable[str | Path], *, progress: ProgressCallback | None = None
    ) -> EnrollmentReport:
        """Adapt the translator to this person from videos of their NEUTRAL face, on the device.

        Every video is decoded and its faces cropped; a video that cannot be used (unreadable,
        no face, too few faces) is reported in ``videos_rejected`` and skipped. F's features of
        the remaining frames drive :func:`pft.core.personalize.personalize` (stage 3); F and C
        are not changed. The previous personalisation (if any) is replaced only on success.

        Parameters
        ----------
        neutral_videos:
            Paths of videos of the person with a neutral expression.
        progress:
            Optional ``progress(stage, done, total)`` callback.

        Raises
        ------
        TooFewFacesError
            Fewer than ``config.personalize.min_frames`` usable face frames in all the videos
            together (the message lists why videos were rejected).
        """
        t0 = time.perf_counter()
        videos = [Path(v).absolute() for v in neutral_videos]
        if not videos:
            raise TooFewFacesError(0, self.config.personalize.min_frames, "enrollment (no videos given)")
        batch = self._face_clips(videos, progress)
        clips = batch.clips
        frames = sum(len(c) for c in clips)
        needed = self.config.personalize.min_frames
        if frames < needed:
            why = "; ".join(r.reason for r in batch.rejected[:3])
            what = f"enrollment from {len(videos)} video(s)" + (
                f" ({len(batch.rejected)} rejected: {why})" if batch.rejected else ""
            )
            raise TooFewFacesError(frames, needed, what)
        real = any(self._is_real(c.record.path) for c in clips)
        return self._adapt(
            np.concatenate([c.crops for c in clips]),
            _Enrollment(
                video_ids=torch.cat(
                    [torch.full((len(c),), k, dtype=torch.long) for k, c in enumerate(clips)]
                ),
                time_index=torch.cat([torch.from_numpy(c.frame_indices.astype(np.int64)) for c in clips]),
                descriptor=_mean_descriptor(clips),
                started=t0,
                videos_given=len(videos),
                used=tuple(c.record.path for c in clips),
                rejected=tuple(batch.rejected),
                real_video=real,
            ),
            progress,
        )

    def enroll_crops(
        self,
        crops: np.ndarray,
        *,
        video_ids: Tensor | None = None,
        time_index: Tensor | None = None,
        descriptor: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
    ) -> EnrollmentReport:
        """Enroll from face crops already cut (uint8 ``(N, S, S, 3)``), e.g. cached by an app.

        Same adaptation as :meth:`enroll`; ``video_ids``/``time_index`` say which clip and frame
        each crop comes from (two frames of one clip are paired), ``descriptor`` is the person's
        landmark descriptor (needed only for ``landmark`` pairing).

        Raises
        ------
        TooFewFacesError
            Fewer crops than ``config.personalize.min_frames``.
        """
        t0 = time.perf_counter()
        crops = np.asarray(crops)
        needed = self.config.personalize.min_frames
        if len(crops) < needed:
            raise TooFewFacesError(len(crops), needed, "enrollment")
        return self._adapt(crops, _Enrollment(video_ids, time_index, descriptor, t0), progress)

    def enroll_features(
        self,
        features: Tensor,
        frame_stats: Tensor,
        *,
        video_ids: Tensor | None = None,
        time_index: Tensor | None = None,
        descriptor: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
    ) -> EnrollmentReport:
        """Enroll from F's outputs a node already has (e.g. read from its feature cache).

        ``features`` (N, D) and ``frame_stats`` (N, 2C) must be what this bundle's F gives for
        the person's NEUTRAL face crops (:func:`pft.core.training.extract_features`); then the
        adaptation, the privacy ledger, the pairing fallback and the personal state are exactly
        those of :meth:`enroll`. ``video_ids``/``time_index``/``descriptor`` as for
        :meth:`enroll_crops`.

        Raises
        ------
        ValueError
            The features or statistics do not have the shapes this bundle's F gives.
        TooFewFacesError
            Fewer rows than ``config.personalize.min_frames``.
        PrivacyBudgetExceededError
            DP is on and the run would exceed the device's budget (nothing was run).
        """
        t0 = time.perf_counter()
        features, frame_stats = self._check_features(features, frame_stats)
        needed = self.config.personalize.min_frames
        if len(features) < needed:
            raise TooFewFacesError(len(features), needed, "enrollment")
        self._plan_release(len(features), video_ids)
        if self.state_dir is not None:
            _contain_torch_cache(self.state_dir)
        return self._personalize(
            features, frame_stats, _Enrollment(video_ids, time_index, descriptor, t0), progress
        )

    def _check_features(self, features: Tensor, frame_stats: Tensor) -> tuple[Tensor, Tensor]:
        """``features`` and ``frame_stats`` as float32 tensors, if they fit this bundle's F."""
        features = torch.as_tensor(features, dtype=torch.float32)
        frame_stats = torch.as_tensor(frame_stats, dtype=torch.float32)
        dim = self.bundle.model_config.pooled_dim
        if features.ndim != 2 or features.shape[1] != dim:
            raise ValueError(f"features must be (N, {dim}) for this bundle's F, got {tuple(features.shape)}")
        if frame_stats.ndim != 2 or len(frame_stats) != len(features):
            raise ValueError(
                f"frame_stats must be (N, 2C) with N = {len(features)} rows, got {tuple(frame_stats.shape)}"
            )
        return features, frame_stats

    def _plan_release(self, n_frames: int, video_ids: Tensor | None) -> None:
        """With DP on, record the run's release in the ledger BEFORE anything runs (write-ahead:
        a run that crashes still counts; one over budget raises and nothing runs)."""
        dp = self.config.personalize.dp
        if dp is not None:
            planned = plan_release(dp, self.config.personalize.adapt, n_frames, video_ids)
            self.ledger.record(planned, "adaptation", note=f"enrollment of {n_frames} frames")

    def _adapt(
        self, crops: np.ndarray, enrollment: _Enrollment, progress: ProgressCallback | None
    ) -> EnrollmentReport:
        self._plan_release(len(crops), enrollment.video_ids)
        if self.state_dir is not None:
            _contain_torch_cache(self.state_dir)
        if progress is not None:
            progress("features", 0, len(crops))
        features, frame_stats = extract_features(self.bundle.extractor, crops)
        if progress is not None:
            progress("features", len(crops), len(crops))
        return self._personalize(features, frame_stats, enrollment, progress)

    def _pairing_model(self, descriptor: np.ndarray | None) -> tuple[SourceModel, str | None]:
        """The source model to adapt with, and whether ``landmark`` pairing fell back to ``random``
        (why, when no landmarks were found: the reference is then drawn at random, not matched)."""
        model = self.source_model
        if model.pairing != "landmark" or descriptor is not None:
            return model, None
        fallback = "landmark pairing needs facial landmarks and none were found; random pairing was used"
        logger.warning(fallback)
        random_model = SourceModel(
            model.classifier, model.translator, model.normalizer, model.styles, model.descriptors, "random"
        )
        return random_model, fallback

    def _personalize(
        self,
        features: Tensor,
        frame_stats: Tensor,
        enrollment: _Enrollment,
        progress: ProgressCallback | None,
    ) -> EnrollmentReport:
        """Stage 3 on F's outputs of the person's neutral frames; the one step every enroll ends in."""
        if progress is not None:
            progress("adapt", 0, 1)
        model, fallback = self._pairing_model(enrollment.descriptor)
        notes: list[str] = [fallback] if fallback is not None else []
        result = personalize(
            model,
            features,
            frame_stats,
            self.config.personalize,
            descriptor=enrollment.descriptor,
            video_ids=enrollment.video_ids,
            time_index=enrollment.time_index,
        )
        result.translator.eval()
        if progress is not None:
            progress("adapt", 1, 1)
        codes = [v for k, v in self.bundle.source_styles.items() if k.startswith("code/")]
        ood = ood_score(result.style_target, codes)
        warning = domain_warning(self.domain, enrollment.real_video)
        if warning is not None:
            notes.insert(0, warning)
            logger.warning(warning)
        if ood == ood and ood > OOD_WARN:  # (nan-safe)
            notes.append(
                f"out-of-distribution score {ood:.1f} (> {OOD_WARN:g}): this person's faces look unlike "
                "the model's source subjects; its labels may not be trustworthy"
            )
        self.personalization = result
        report = EnrollmentReport(
            videos_given=enrollment.videos_given,
            videos_used=enrollment.used,
            videos_rejected=enrollment.rejected,
            frames_used=len(features),
            iterations=result.result.iterations,
            converged=result.result.converged,
            adapt_seconds=result.result.seconds,
            seconds=time.perf_counter() - enrollment.started,
            reference_subject=result.reference_subject,
            pairing=model.pairing,
            privacy=result.privacy.summary() if result.privacy is not None else None,
            pairing_fallback=fallback,
            ood_score=ood,
            warnings=tuple(notes),
        )
        self.enrollment = {
            "frames_used": report.frames_used,
            "videos_used": len(enrollment.used),
            "iterations": report.iterations,
            "converged": report.converged,
            "adapt_seconds": report.adapt_seconds,
            "pairing": report.pairing,
            "pairing_fallback": report.pairing_fallback,
            "ood_score": report.ood_score,
            "privacy": report.privacy,
            "enrolled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return report

    # prediction ------------------------------------------------------------------------------
    @torch.no_grad()
    def feature_logits(self, features: Tensor) -> Tensor:
        """Class logits (N, K) of F's features (N, D): ``C(T(f))`` once enrolled, else ``C(f)``."""
        classifier = self.bundle.classifier
        classifier.eval()
        if self.personalization is not None:
            return self.personalization.logits(classifier, features)
        return classifier(features)

    @torch.no_grad()
    def probabilities(self, crops: np.ndarray | Tensor) -> np.ndarray:
        """Class probabilities (N, K) of face crops: ``C(T(F(x)))`` once enrolled, else ``C(F(x))``."""
        bundle = self.bundle
        bundle.extractor.eval()
        x = preprocess(crops, bundle.model_config.image_size)
        logits = self.feature_logits(bundle.extractor(x))
        return torch.softmax(logits, dim=1).numpy().astype(np.float32)

    def _prediction(
        self, probs: np.ndarray, indices: np.ndarray, given: int, real_video: bool = False
    ) -> Prediction:
        warning = domain_warning(self.domain, real_video)
        if warning is not None:
            logger.warning(warning)
        return Prediction(
            class_names=self.class_names,
            probabilities=probs,
            frame_indices=indices.astype(np.int64),
            smoothed=smooth_probabilities(probs, self.config.smoothing, self.config.ema_alpha),
            smoothing=self.config.smoothing,
            personalized=self.enrolled,
            frames_given=given,
            warnings=(warning,) if warning is not None else (),
        )

    def predict_crops(self, crops: np.ndarray) -> Prediction:
        """Predict aligned face crops, uint8 ``(S, S, 3)`` or ``(N, S, S, 3)`` (no detection)."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if len(crops) == 0:
            raise ValueError("no crops given")
        return self._prediction(self.probabilities(crops), np.arange(len(crops)), len(crops))

    def predict(self, source: str | Path | np.ndarray) -> Prediction:
        """Per-frame probabilities and a smoothed label for a video file, a frame or frames.

        Parameters
        ----------
        source:
            A video path (decoded and sampled with ``config.video``, faces found with the
            configured detector), or RGB uint8 camera frames ``(H, W, 3)`` / ``(N, H, W, 3)``
            (faces found with the default real-face detector or the custom one). Frames without a face
            get no row; ``frame_indices`` says which frames the rows are.

        Raises
        ------
        VideoError
            The video cannot be used (typed subclass naming the file), or no frame has a face.
        """
        if isinstance(source, str | Path):
            video = Path(source).absolute()
            detector, landmarker = self._detectors_for(video)
            decoder = self._video_decoder() if self.config.video.isolate else None
            clip = extract_face_clip(
                VideoRecord(path=video, subject="me"),
                self.config.video,
                self.crop_config,
                detector,
                landmarker,
                decoder,
            )
            return self._prediction(
                self.probabilities(clip.crops), clip.frame_indices, clip.sampled_frames, self._is_real(video)
            )
        frames = np.asarray(source)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected RGB uint8 frames (H, W, 3) or (N, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        detector = self._detector or self._real_detectors()[0]
        crops, indices = [], []
        for i, frame in enumerate(frames):
            boxes = detector.detect(frame)
            if boxes:
                box = max(boxes, key=lambda b: (b.score, b.width * b.height))
                crops.append(crop_face(frame, box, self.crop_config.size, self.crop_config.margin))
                indices.append(i)
        if not crops:
            raise NoFaceError("<frames>", f"0 of {len(frames)} frames")
        return self._prediction(self.probabilities(np.stack(crops)), np.asarray(indices), len(frames), True)

    # personal state --------------------------------------------------------------------------
    def _store(self, key: StoreKey) -> EncryptedStore:
        if self.state_dir is None:
            raise StoreError("no state_dir: give one to Personalizer.from_bundle to save personal state")
        return personal_store(self.state_dir, key)

    def personal_state(self) -> PersonalState:
        """The personal state to store (:mod:`pft.client.personal_state`).

        Raises
        ------
        PFTError
            Not enrolled yet.
        """
        if self.personalization is None:
            raise PFTError("nothing to save: enroll the person first")
        p = self.personalization
        return PersonalState(
            bundle_digest=self.bundle_digest,
            bundle_version=self.bundle.bundle_version,
            translator=dict(p.translator.state_dict()),
            style_target=p.style_target,
            style_reference=p.style_reference,
            reference_subject=p.reference_subject,
            privacy_ledger=list(self.privacy_ledger),
            enrollment=dict(self.enrollment),
        )

    def state_payload(self) -> dict[str, Any]:
        """The personal state as stored (translator weights, style codes, ledger, bundle digest)."""
        return self.personal_state().to_payload()

    def save(self, key: StoreKey | None = None, *, owner: str | None = None) -> Path:
        """Encrypt and write the personal state to ``state_dir/personal.store`` (atomic).

        The previous good generation is kept as ``personal.store.prev``. ``key`` and ``owner``
        default to the ones given to :meth:`from_bundle` / :meth:`load`. The privacy ledger is
        created first if the state has none yet, and the ledger's copy in the personal store is
        merged (it never gets shorter), under the store's lock.

        Raises
        ------
        StoreError
            No ``state_dir``, no key or owner, or not enrolled yet.
        StoreAuthenticationError
            The key does not open the existing store (nothing is overwritten).
        """
        key = key or self._key
        owner = owner or self._owner
        if key is None or not owner:
            raise StoreError("save needs the store key and the owner (user id)")
        payload = self.state_payload()
        store = self._store(key)
        if self.ledger.is_locked or (key, owner) != (self._key, self._owner):
            self.ledger = self._open_ledger(key, owner)  # the ledger goes with this key and owner
            self.ledger.merge(payload["privacy_ledger"])
        self.ledger.refresh()  # releases other processes recorded on this state meanwhile
        self.ledger.ensure_stored()  # before the personal store: a state never exists without one
        ours = self.ledger.as_list()

        def merged(current: dict[str, Any] | None) -> dict[str, Any]:
            copy = ours
            stored = (current or {}).get("privacy_ledger")
            if isinstance(stored, list):
                try:  # the copy in the personal store never gets shorter
                    copy = longer_history(stored, ours, str(store.path))
                except LedgerIntegrityError as exc:
                    logger.error("%s; keeping the copy the personal store had", exc)
                    copy = stored
            return {**payload, "privacy_ledger": copy}

        store.update(merged, owner=owner)
        self._key, self._owner = key, owner
        return store.path

    def _restore(self, payload: dict[str, Any], where: str) -> None:
        state = PersonalState.from_payload(
            payload, where, bundle_digest=self.bundle_digest, bundle_version=self.bundle.bundle_version
        )
        translator = Translator(self.bundle.model_config)
        try:
            translator.load_state_dict(state.translator, strict=True)
        except RuntimeError as exc:
            raise StoreError(f"{where}: the saved translator does not fit the bundle ({exc})") from exc
        translator.eval()
        enrollment = state.enrollment
        result = AdaptResult(
            method="pft",
            iterations=int(enrollment.get("iterations", 0)),
            converged=bool(enrollment.get("converged", False)),
            seconds=float(enrollment.get("adapt_seconds", 0.0)),
            history={},
        )
        self.personalization = Personalization(
            translator, state.style_target, state.style_reference, state.reference_subject, result
        )
        self.ledger.merge(state.privacy_ledger)  # keeps the longer history
        self.enrollment = enrollment

    # export ----------------------------------------------------------------------------------
    def fused_model(self) -> PersonalizedModel:
        """F, T and C (or F and C before enrollment) as one module taking uint8/float crops."""
        p = self.personalization
        return PersonalizedModel(
            self.bundle.extractor,
            self.bundle.classifier,
            p.translator if p else None,
            p.style_target if p else None,
            p.style_reference if p else None,
        )

    def export(
        self, path: str | Path, format: ExportFormat = "onnx", *, input_dtype: InputDType = "uint8"
    ) -> Path:
        """Write the personalised model for a mobile runtime (see :mod:`pft.client.export`).

        The file takes RGB crops ``(N, S, S, 3)`` (``S`` = ``info()["image_size"]``) and returns
        probabilities ``(N, K)``; class names, the bundle digest and whether it is personalised
        are stored in its metadata. It holds the person's translator: keep it on the device.
        """
        return export_model(
            self.fused_model(),
            path,
            format,
            input_dtype=input_dtype,
            metadata={
                "class_names": list(self.class_names),
                "bundle_digest": self.bundle_digest,
                "bundle_version": self.bundle.bundle_version,
                "personalized": self.enrolled,
            },
        )
