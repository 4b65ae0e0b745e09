"""Make a cohort: plan clips per subject, animate actions over time, render, encode, write.

Each subject draws everything from its own random stream, derived with ``numpy.random.SeedSequence``
from (profile, seed, subject index), and each clip from a separate stream keyed by
(subject, split, class, clip): a cohort is identical whatever the number of worker processes,
and the neutral ``adapt`` clips of a target share no randomness with its ``eval`` clips.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np

from pft.core.cohort.config import GENERATOR_VERSION, CohortConfig
from pft.core.cohort.identity import Subject, sample_subject
from pft.core.cohort.manifest import CohortManifest, Split, SubjectInfo, VideoEntry
from pft.core.cohort.profiles import AU_NAMES, BUILTIN_PROFILES, ExpressionSpec, ProfileSpec, register_profile
from pft.core.cohort.render import FrameState, Occluder, make_session_look, render_frame

_SPLIT_CODE: dict[str, int] = {"identity": 0, "train": 1, "adapt": 2, "oracle": 3, "eval": 4}
ProgressFn = Callable[[int, int], None]


def _root_entropy(config: CohortConfig) -> list[int]:
    return [config.seed, zlib.crc32(config.profile.encode())]


def subject_rng(config: CohortConfig, index: int) -> np.random.Generator:
    """The random stream of subject ``index``'s identity and traits."""
    seq = np.random.SeedSequence(_root_entropy(config), spawn_key=(index, _SPLIT_CODE["identity"]))
    return np.random.default_rng(seq)


def clip_rng(config: CohortConfig, index: int, split: str, label: int, clip: int) -> np.random.Generator:
    """The random stream of one clip, separate for every (subject, split, class, clip)."""
    seq = np.random.SeedSequence(_root_entropy(config), spawn_key=(index, _SPLIT_CODE[split], label, clip))
    return np.random.default_rng(seq)


def make_subject(config: CohortConfig, index: int) -> Subject:
    """Draw subject ``index`` (sources come first, then targets)."""
    role: Literal["source", "target"] = "source" if index < config.n_source else "target"
    width = max(3, len(str(config.n_source + config.n_target)))
    return sample_subject(subject_rng(config, index), config.spec, index, role, id_width=width)


def plan_clips(config: CohortConfig, role: str) -> list[tuple[Split, int, int]]:
    """The (split, class index, clip number) of every clip a subject gets."""
    counts = config.clip_counts
    n_classes = len(config.spec.classes)
    if role == "source":
        return [("train", c, k) for c in range(n_classes) for k in range(counts.train)]
    plan: list[tuple[Split, int, int]] = [("adapt", 0, k) for k in range(counts.adapt)]
    plan += [("oracle", c, k) for c in range(n_classes) for k in range(counts.oracle)]
    plan += [("eval", c, k) for c in range(n_classes) for k in range(counts.eval)]
    return plan


# --- temporal structure ----------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, frames: int, knots: int = 4) -> np.ndarray:
    values = rng.uniform(-1.0, 1.0, size=knots)
    return np.interp(np.linspace(0, knots - 1, frames), np.arange(knots), values)


def _sustained_envelope(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Onset - apex - offset, the apex covering most frames (onset and offset of 1..frames//8
    frames each, starting within the first frame or two)."""
    ramp = max(1, frames // 8)
    n_on = int(rng.integers(1, ramp + 1))
    n_off = int(rng.integers(1, ramp + 1))
    start = int(rng.integers(0, 2))
    idx = np.arange(frames, dtype=float)
    rise = np.clip((idx - start + 1) / (n_on + 1), 0.0, 1.0)
    fall = np.clip((frames - idx) / (n_off + 1), 0.0, 1.0)
    e = np.minimum(rise, fall)
    return e * e * (3 - 2 * e)


def _mixed_envelopes(rng: np.random.Generator, frames: int, actions: list[str]) -> dict[str, np.ndarray]:
    """Brief, possibly conflicting bursts that together cover the clip (BAH-like ambivalence).

    The clip is cut into segments of 3..6 frames; each segment shows a random subset of at least
    two of the actions (conflicting signals at once, e.g. a smile with a lip-corner depressor) as a
    short bump (1 at its centre, >= 0.5 at its ends), so the signals change and conflict from
    segment to segment, yet every frame shows them.
    """
    out = {au: np.zeros(frames) for au in actions}
    t = 0
    while t < frames:
        length = min(int(rng.integers(3, 7)), frames - t)
        k = int(rng.integers(min(2, len(actions)), len(actions) + 1))
        chosen = rng.choice(len(actions), size=k, replace=False)
        x = (np.arange(length) - (length - 1) / 2) / max(length / 2, 1.0)
        bump = 1.0 - 0.5 * x**2
        for j in chosen:
            seg = out[actions[int(j)]][t : t + length]
            np.maximum(seg, bump, out=seg)
        t += length
    return out


def _blinks(rng: np.random.Generator, frames: int, rate_per_frame: float) -> np.ndarray:
    b = np.zeros(frames)
    for _ in range(int(rng.poisson(rate_per_frame * frames))):
        t0 = int(rng.integers(0, frames))
        b[t0] = 1.0
        for d in (-1, 1):
            if 0 <= t0 + d < frames:
                b[t0 + d] = max(b[t0 + d], 0.45)
    return b


def _clip_states(
    subject: Subject,
    spec: ProfileSpec,
    config: CohortConfig,
    label: int,
    rng: np.random.Generator,
) -> tuple[list[FrameState], np.ndarray, float]:
    """Animate one clip: per-frame actions, pose, gaze, placement; and the expression intensity."""
    frames, fps = config.clip_frames, config.fps
    name = spec.classes[label]
    behaviour: ExpressionSpec = spec.neutral if label == 0 else spec.expressions[name]
    weights = subject.style.get(name, {}) if label else {}
    apex = float(rng.uniform(spec.intensity.lo, spec.intensity.hi)) if label else 0.0
    gain = apex * subject.expressiveness
    envelopes: dict[str, np.ndarray] = {}
    if label and behaviour.dynamics == "mixed":
        envelopes = _mixed_envelopes(rng, frames, list(weights))
    elif label:
        shared = _sustained_envelope(rng, frames)
        envelopes = {au: shared for au in weights}
    n = len(AU_NAMES)
    aus = np.zeros((frames, n))
    for j, au in enumerate(AU_NAMES):
        drift = 0.03 * _smooth_noise(rng, frames)
        rest = subject.resting_aus.get(au, 0.0)
        expr = envelopes[au] * gain * weights[au] if au in envelopes else 0.0
        aus[:, j] = np.clip(rest + drift + expr, 0.0, 1.0)
    blink = _blinks(rng, frames, behaviour.blink_rate / fps)
    j43 = AU_NAMES.index("AU43")
    aus[:, j43] = np.maximum(aus[:, j43], blink)
    activity = np.max(np.stack(list(envelopes.values())), axis=0) if envelopes else np.zeros(frames)
    intensity = activity * apex

    cap = subject.capture
    t = np.arange(frames) / fps
    base_yaw = cap.yaw + rng.normal(0.0, 2.0)
    base_pitch = cap.pitch + rng.normal(0.0, 2.0)
    base_roll = cap.roll + rng.normal(0.0, 1.5)
    shake_window = activity if behaviour.dynamics == "mixed" and label else np.ones(frames)
    yaw = (
        base_yaw
        + behaviour.head_motion * _smooth_noise(rng, frames)
        + behaviour.head_shake
        * np.sin(2 * np.pi * rng.uniform(1.2, 2.2) * t + rng.uniform(0, 6.3))
        * shake_window
    )
    pitch = (
        base_pitch
        + 0.7 * behaviour.head_motion * _smooth_noise(rng, frames)
        + behaviour.head_nod * np.sin(2 * np.pi * rng.uniform(0.8, 1.6) * t + rng.uniform(0, 6.3))
    )
    roll = base_roll + 0.5 * behaviour.head_motion * _smooth_noise(rng, frames)
    gaze = np.tile(rng.normal(0.0, 0.15, size=2), (frames, 1))
    gaze += 0.1 * np.stack([_smooth_noise(rng, frames), _smooth_noise(rng, frames)], -1)
    if rng.random() < behaviour.gaze_aversion:
        away = np.array([rng.choice([-0.9, 0.9]), rng.uniform(0.0, 0.8)])
        a0 = int(rng.integers(0, frames // 2 + 1))
        a1 = int(rng.integers(a0 + max(1, frames // 4), frames + 1))
        gaze[a0:a1] = away
    gaze = np.clip(gaze, -1.0, 1.0)

    cs = spec.capture
    scale = 0.31 * (1.0 + float(np.clip(rng.normal(0.0, cs.scale_jitter), -0.12, 0.12)))
    cx = 0.5 + rng.uniform(-cs.shift, cs.shift)
    cy = 0.47 + 0.6 * rng.uniform(-cs.shift, cs.shift)
    jit = (
        cs.frame_jitter
        * np.cumsum(rng.normal(0.0, 0.6, size=(frames, 3)), axis=0)
        / np.sqrt(np.arange(1, frames + 1))[:, None]
    )
    occ_frames = np.zeros(frames, dtype=bool)
    occluder: Occluder | None = None
    occ_path = np.zeros((frames, 2))
    if rng.random() < cs.occlusion:
        length = int(rng.integers(max(1, frames // 3), frames + 1))
        o0 = int(rng.integers(0, frames - length + 1))
        occ_frames[o0 : o0 + length] = True
        kind: Literal["hand", "bar"] = "hand" if rng.random() < 0.6 else "bar"
        start = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.2, 0.8)])
        end = start + rng.normal(0.0, 0.15, size=2)
        occ_path = start + np.linspace(0.0, 1.0, frames)[:, None] * (end - start)
        rgb = (
            np.array(subject.identity.skin) * rng.uniform(0.85, 1.1)
            if kind == "hand"
            else rng.uniform(10, 90, size=3)
        )
        rgb = np.clip(rgb, 0, 255)
        color = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
        size, angle = float(rng.uniform(0.45, 0.8)), float(rng.uniform(-0.6, 0.6))
        occluder = Occluder(kind, 0.0, 0.0, size, angle, color)

    states: list[FrameState] = []
    for i in range(frames):
        occ_i = None
        if occluder is not None and occ_frames[i]:
            occ_i = Occluder(
                occluder.kind,
                float(occ_path[i, 0]),
                float(occ_path[i, 1]),
                occluder.size,
                occluder.angle,
                occluder.color,
            )
        states.append(
            FrameState(
                aus={au: float(aus[i, j]) for j, au in enumerate(AU_NAMES)},
                yaw=float(yaw[i]),
                pitch=float(pitch[i]),
                roll=float(roll[i]),
                gaze=(float(gaze[i, 0]), float(gaze[i, 1])),
                center=(float(cx + jit[i, 0]), float(cy + jit[i, 1])),
                scale=float(scale * (1.0 + jit[i, 2])),
                occluder=occ_i,
            )
        )
    return states, intensity, apex


def render_clip(
    subject: Subject, config: CohortConfig, split: str, label: int, clip: int
) -> tuple[list[np.ndarray], dict[str, Any], float]:
    """Render one clip of a subject.

    Returns
    -------
    tuple
        The RGB frames, the sidecar dict (``frame_size`` and per-frame ground truth) and the apex
        intensity (0 for neutral clips).
    """
    spec = config.spec
    size = config.clip_size
    rng = clip_rng(config, subject.index, split, label, clip)
    cap = subject.capture
    bg = np.clip(np.array(cap.background) + rng.normal(0.0, 12.0, size=3), 0, 255)
    look = make_session_look(
        rng,
        size,
        background=(int(bg[0]), int(bg[1]), int(bg[2])),
        background_alt=cap.background_alt,
        light_dir=cap.light_dir + float(rng.normal(0.0, 0.3)),
        light_level=cap.light_level * float(rng.uniform(0.92, 1.08)),
        light_gradient=cap.light_gradient * float(rng.uniform(0.8, 1.2)),
        contrast=cap.contrast * float(rng.uniform(0.95, 1.05)),
        noise=cap.noise * float(rng.uniform(0.8, 1.2)),
        blur=cap.blur * float(rng.uniform(0.7, 1.3)),
        glare=float(rng.uniform(0.0, 0.45)) if subject.identity.glasses else 0.0,
    )
    states, intensity, apex = _clip_states(subject, spec, config, label, rng)
    frames: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    for state, level in zip(states, intensity, strict=True):
        out = render_frame(subject.identity, state, look, size, rng)
        frames.append(out.image)
        records.append(
            {
                "box": [round(float(v), 2) for v in out.box],
                "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in out.landmarks],
                "pose": [round(state.yaw, 2), round(state.pitch, 2), round(state.roll, 2)],
                "au": {k: round(v, 2) for k, v in state.aus.items()},
                "intensity": round(float(level), 2),
            }
        )
    return frames, {"frame_size": [size, size], "frames": records}, apex


def encode_mp4(frames: list[np.ndarray], fps: int) -> bytes:
    """Encode RGB frames as H.264 (libx264, yuv420p, one thread, no lookahead: byte-identical
    for identical frames)."""
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=fps,
            # x264's lookahead (B-frame decisions, mb-tree) gives run-to-run different bitstreams
            # on short clips; without it the bytes are a function of the frames alone.
            options={
                "crf": "17",
                "preset": "veryfast",
                "threads": "1",
                "x264-params": "bframes=0:rc-lookahead=0:mbtree=0:sync-lookahead=0",
            },
        )
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i  # explicit timestamps: without them the bitstream varies between runs
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _subject_info(subject: Subject) -> SubjectInfo:
    return SubjectInfo(
        id=subject.subject_id,
        index=subject.index,
        role=subject.role,
        age_group=subject.identity.age_group,
        expressiveness=round(subject.expressiveness, 4),
        resting_leans=subject.resting_leans,
        resting_offset_strength=round(subject.resting_strength, 4),
        resting_aus=subject.resting_aus,
        style={c: {a: round(w, 4) for a, w in ws.items()} for c, ws in subject.style.items()},
        traits=subject.traits,
    )


def render_subject(
    config: CohortConfig, index: int
) -> tuple[SubjectInfo, list[VideoEntry], dict[str, bytes]]:
    """Render and encode every clip of subject ``index`` without writing anything: its manifest
    rows and its files (path relative to the cohort folder -> bytes). Per-subject work that can
    run anywhere (a process pool, a Ray worker); :func:`write_subject_files` writes the files."""
    cv2.setNumThreads(1)
    subject = make_subject(config, index)
    entries: list[VideoEntry] = []
    files: dict[str, bytes] = {}
    classes = config.spec.classes
    for split, label, clip in plan_clips(config, subject.role):
        frames, sidecar, apex = render_clip(subject, config, split, label, clip)
        data = encode_mp4(frames, config.fps)
        rel = f"{subject.subject_id}/{classes[label]}/{split}_{clip}"
        files[f"{rel}.mp4"] = data
        files[f"{rel}.faces.json"] = json.dumps(sidecar, separators=(",", ":")).encode()
        entries.append(
            VideoEntry(
                path=f"{rel}.mp4",
                sidecar=f"{rel}.faces.json",
                subject=subject.subject_id,
                label=classes[label],
                label_index=label,
                split=split,
                clip=clip,
                frames=len(frames),
                fps=config.fps,
                apex_intensity=round(apex, 4),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    return _subject_info(subject), entries, files


def write_subject_files(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write one subject's rendered files (from :func:`render_subject`) under ``out_dir``."""
    for rel, data in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, data)


def make_subject_videos(
    config: CohortConfig, index: int, out_dir: Path
) -> tuple[SubjectInfo, list[VideoEntry]]:
    """Render, encode and write every clip of subject ``index``; return its manifest rows."""
    info, entries, files = render_subject(config, index)
    write_subject_files(out_dir, files)
    return info, entries


def worker_payload(config: CohortConfig) -> dict[str, Any]:
    """``config`` as sent to another process (a spawned worker, a Ray worker): its JSON, and for a
    profile registered in this process (not built in) the profile's whole spec, which the other
    process has not got (it starts with the built-in and entry-point profiles only)."""
    payload: dict[str, Any] = {"config": config.model_dump(mode="json")}
    if config.profile not in BUILTIN_PROFILES:
        payload["profile_spec"] = config.spec.model_dump(mode="json")
    return payload


def config_from_payload(payload: dict[str, Any]) -> CohortConfig:
    """The :class:`CohortConfig` of :func:`worker_payload`'s output, registering its profile first
    when it came with one (an equal spec registered before is left as it is)."""
    if "profile_spec" in payload:
        register_profile(ProfileSpec.model_validate(payload["profile_spec"]))
    return CohortConfig.model_validate(payload["config"])


def _worker(args: tuple[dict[str, Any], int, str]) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    config = config_from_payload(args[0])
    info, entries = make_subject_videos(config, args[1], Path(args[2]))
    return args[1], info.model_dump(), [e.model_dump() for e in entries]


def manifest_config(config: CohortConfig) -> dict[str, Any]:
    """The config recorded in the manifest: subject counts resolved, worker count dropped
    (it does not change the cohort)."""
    return config.model_copy(
        update={"source_subjects": config.n_source, "target_subjects": config.n_target, "workers": None}
    ).model_dump(mode="json")


def make_cohort(config: CohortConfig, out_dir: Path, progress: ProgressFn | None = None) -> CohortManifest:
    """Generate the cohort ``config`` describes into ``out_dir``.

    Parameters
    ----------
    config:
        Profile, seed, sizes and mode (validated on construction).
    out_dir:
        Destination folder; gets ``manifest.json``, ``config.json`` and
        ``<subject>/<class>/<split>_<k>.mp4`` with ``.faces.json`` sidecars.
    progress:
        Called as ``progress(done_subjects, total_subjects)`` as subjects finish.

    Returns
    -------
    CohortManifest
        The manifest written to ``out_dir/manifest.json``; identical for identical configs
        whatever the worker count.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = config.n_source + config.n_target
    workers = min(config.workers or os.cpu_count() or 1, total)
    infos: dict[int, SubjectInfo] = {}
    videos: dict[int, list[VideoEntry]] = {}
    done = 0
    if progress:
        progress(0, total)
    if workers <= 1:
        for index in range(total):
            infos[index], videos[index] = make_subject_videos(config, index, out_dir)
            done += 1
            if progress:
                progress(done, total)
    else:
        payload = worker_payload(config)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, (payload, index, str(out_dir))) for index in range(total)]
            for future in as_completed(futures):
                index, info, entries = future.result()
                infos[index] = SubjectInfo.model_validate(info)
                videos[index] = [VideoEntry.model_validate(e) for e in entries]
                done += 1
                if progress:
                    progress(done, total)
    return write_manifest(config, out_dir, infos, videos)


def write_manifest(
    config: CohortConfig, out_dir: Path, infos: dict[int, SubjectInfo], videos: dict[int, list[VideoEntry]]
) -> CohortManifest:
    """The cohort's manifest from every subject's rows (keyed by subject index), written with
    ``config.json`` into ``out_dir`` (after every subject's files are there)."""
    total = config.n_source + config.n_target
    manifest = CohortManifest(
        generator_version=GENERATOR_VERSION,
        profile=config.profile,
        seed=config.seed,
        config=manifest_config(config),
        classes=list(config.spec.classes),
        frame_size=config.clip_size,
        fps=config.fps,
        frames_per_clip=config.clip_frames,
        subjects=[infos[i] for i in range(total)],
        videos=[v for i in range(total) for v in videos[i]],
    )
    config.write_json(out_dir / "config.json")
    manifest.write(out_dir)
    return manifest
