"""What a face family's adapter provides to rooms and the pipeline.

A room pushes each video frame's audio into its family's `FaceSpeech` and gets back,
in order, the frames whose audio input is complete, as `FrameAudio`: whether the frame
is silent (the base frame is shown and no model runs) and, when awaited, the face
model's audio input for that frame. A family whose audio input comes from a feature
model (HuBERT for Ultralight) submits those items to the device as the audio arrives,
batched across rooms like any other stage; Wav2Lip's mel windows are computed here on
the host.

A family with a motion input also redraws a frame from face motion (`FaceFamily.drive`),
for motion-capture rooms, and may read a camera driver's face with a model of its own
(`CameraReading`: LivePortrait's motion extractor), for camera rooms.

A family's adapter module has a ``load(folder, ctx)`` giving its `FamilyRuntime` on
one worker (None where the model folder does not name its models): the models it
serves, why it would refuse an avatar, an avatar's `FaceFamily`, and its face
profiles. The pipeline knows families only through these.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.device.binding import AudioRole, FaceLayout
from workers.device.engine import BatchKey, DeviceModel, InferenceEngine

if typing.TYPE_CHECKING:
    from avatarfarm.preparation.bundle import Bundle, Manifest
    from workers.device.onnx import OrtModel


class FrameAudio(typing.Protocol):
    """One video frame's audio input to the face model."""

    @property
    def silent(self) -> bool: ...

    async def value(self) -> np.ndarray:
        """The face model's audio input for the frame (one item, no batch axis)."""
        ...


class FaceSpeech(typing.Protocol):
    """A room's audio -> its frames' audio inputs, at one frame rate."""

    @property
    def frames_emitted(self) -> int: ...

    def push(self, samples: np.ndarray, deadline: float) -> list[FrameAudio]:
        """Adds one frame's audio (mono, 16 kHz float32); returns the frames whose input
        became complete, in order. ``deadline``: when work started now must be done."""
        ...

    def finish(self, n_frames: int) -> list[FrameAudio]:
        """The audio ends (the stream's end, or a rate change): the inputs of every frame
        up to ``n_frames`` in all, the missing audio read as silence."""
        ...


# (the frame's audio input, the room's FaceAvatar, the base frame's index, deadline,
# priority) -> the redrawn face [3, S, S] BGR in 0..1 as a pipeline `Timed`
Redraw = typing.Callable[[np.ndarray, typing.Any, int, float, int], typing.Awaitable[typing.Any]]


@dataclass(frozen=True, slots=True)
class FaceFamily:
    """A loaded face model as rooms use it: its batch key, how it is bound, how a room's
    audio is turned into its input (`speech`, a factory per room and rate) and how a
    speaking frame is redrawn (`redraw`: one device item, or a chain of them)."""

    name: str  # the family: "wav2lip", "ultralight"
    key: BatchKey  # the face model at its crop side
    layout: FaceLayout
    audio: AudioRole
    # (fps, priority, on_seconds) -> a room's stream; on_seconds(s): device time the
    # room's feature items took, for its cost
    speech: typing.Callable[[int, int, typing.Callable[[float], None]], FaceSpeech]
    redraw: Redraw
    # A family with a motion input (LivePortrait): a frame redrawn from one frame of face
    # motion (`avatarfarm.face_motion`) in place of the audio input, for motion-capture
    # rooms; None: the family has none, and motion-capture rooms are refused.
    drive: Redraw | None = None
    # A family that reads a camera driver's face with its own model; None: camera rooms
    # read it with the worker's face reader and drive through `drive`.
    camera: CameraReading | None = None


@dataclass(frozen=True, slots=True)
class CameraReading:
    """How a family reads a camera driver's face and redraws the avatar from it.

    ``read``: a face crop ([3, side, side] RGB 0..1, the detector's box with the chin
    margin below, as avatars are cropped), the frame's deadline and priority -> the
    driver's motion in the frame as a pipeline `Timed` (one device item). ``relative``:
    (that motion, the driver's reference motion) -> what ``drive`` takes: the avatar
    moves as the driver moved from their reference (the first frame of theirs read).
    ``from_face``: face motion (blendshapes their own tracker sent) -> what ``drive`` takes.
    """

    side: int
    read: typing.Callable[[np.ndarray, float, int], typing.Awaitable[typing.Any]]
    relative: typing.Callable[[np.ndarray, np.ndarray], np.ndarray]
    drive: Redraw
    from_face: typing.Callable[[np.ndarray], np.ndarray]


Points = tuple[tuple[int, float], ...]  # (batch size, seconds) of a latency curve


class ServedModel(DeviceModel, typing.Protocol):
    """A family's device model: named, and able to give one item to time it by."""

    name: str

    def example_item(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True, slots=True)
class Served:
    """A model a family serves on the device, under its batch key."""

    key: BatchKey
    model: ServedModel


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What a family's runtime takes from its worker."""

    engine: InferenceEngine
    load: typing.Callable[[str, Path], OrtModel]  # (name, path) -> a session on the worker's device
    features: typing.Any  # the shared audio feature model (workers.families.features), or None
    submit_features: typing.Callable[[np.ndarray, float, int], typing.Awaitable[typing.Any]]
    redraw_crop: typing.Callable[[BatchKey], Redraw]  # one face-model item on the base crop
    timed: typing.Callable[..., typing.Any]  # (value, seconds, batch size) -> pipeline.Timed


class FamilyRuntime(typing.Protocol):
    """A face family's models loaded on one worker."""

    name: str

    def served(self) -> list[Served]:
        """The models it serves now (an avatar's own models once loaded), to time and serve."""
        ...

    def refusal(self, avatar_id: str, manifest: Manifest) -> str | None:
        """Why this worker cannot render the avatar (None: it can)."""
        ...

    def family(self, bundle: Bundle) -> FaceFamily:
        """The avatar's family, loading (and serving) what it needs of its own."""
        ...

    def face_keys(self) -> list[BatchKey]:
        """The keys a face profile is reported for (one per face model)."""
        ...

    def renders(self) -> list[str]:
        """The video avatars' families it renders here, as avatars name what they need
        (`avatarfarm.avatars.face_family`): the scheduler places their rooms by it."""
        ...

    def release(self, key: BatchKey) -> bool:
        """No room uses the model under ``key`` any more: unloads it if it is an avatar's
        own (True), keeps it if it is the folder's, shared by the family's avatars (False)."""
        ...

    def face_profile(self, key: BatchKey) -> tuple[str, Points] | None:
        """The profile the scheduler places by for one of its keys (by family and model
        name; the stages a frame goes through summed), or None for a key not its own."""
        ...
