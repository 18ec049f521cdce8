"""MuseTalk's preparation: each base frame's VAE latents, computed once per avatar.

MuseTalk inpaints in the latent space of its VAE (sd-vae-ft-mse): per base frame the
UNet takes the latents of the face crop with its lower half blanked (the part it
redraws) and of the whole crop (the reference), 4 channels each at 1/8 of the crop's
side. The VAE encoder runs only here: the latents ([frames, 8, 32, 32] at a 256 px crop,
masked first, scaled by the VAE's scaling factor) are stored in the bundle, and
workers run only the UNet and the VAE decoder.

The encoder is the user's ONNX export: input ``[B, 3, S, S]`` RGB in [-1, 1], output
``[B, 4, S/8, S/8]`` (or the distribution's ``[B, 8, S/8, S/8]`` moments, whose mean, the
first 4 channels, is taken: deterministic, so preparing twice gives the same latents).
"""

from __future__ import annotations

import hashlib

import numpy as np

from avatarfarm.preparation.faces import PreparationError

SCALING = 0.18215  # sd-vae-ft-mse
BATCH = 8


def model_id(vae_encoder: bytes) -> str:
    return hashlib.sha256(vae_encoder).hexdigest()


def vae_latents(crops_bgr: np.ndarray, vae_encoder: bytes) -> np.ndarray:
    """[frames, S, S, 3] uint8 BGR crops -> [frames, 8, S/8, S/8] float32: the masked
    crop's latents, then the whole crop's, scaled."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(vae_encoder, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise PreparationError(f"the VAE encoder does not load: {e}") from e
    (inp,), outs = session.get_inputs(), session.get_outputs()
    s = crops_bgr.shape[1]
    shape = list(inp.shape)
    if len(shape) != 4 or shape[1] != 3 or any(isinstance(d, int) and d != s for d in shape[2:]):
        raise PreparationError(f"the VAE encoder's input {inp.name} is {shape}; expected "
                               f"[B, 3, {s}, {s}] RGB in [-1, 1]")
    out = []
    for i in range(0, len(crops_bgr), BATCH):
        rgb = crops_bgr[i:i + BATCH, :, :, ::-1].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        masked = rgb.copy()
        masked[:, :, s // 2:] = 0.0  # MuseTalk's half mask
        both = np.concatenate([masked, rgb])
        (lat,) = session.run([outs[0].name], {inp.name: both})
        lat = np.asarray(lat, np.float32)
        if lat.ndim != 4 or lat.shape[1] not in (4, 8) or lat.shape[2:] != (s // 8, s // 8):
            raise PreparationError(f"the VAE encoder's output {outs[0].name} is {list(lat.shape)}; "
                                   f"expected [B, 4, {s // 8}, {s // 8}] latents (or 8 channels of moments)")
        lat = lat[:, :4] * SCALING
        n = len(rgb)
        out.append(np.concatenate([lat[:n], lat[n:]], axis=1))
    return np.concatenate(out)
