"""Model families that redraw a prepared video avatar's face from speech.

A family is what a model folder's manifest (or an avatar bundle) declares, plus one
adapter module here where the family needs its own arithmetic: how a room's audio
becomes each frame's audio input (`FaceSpeech`), and how the face model is bound
(`workers.device.binding`). Everything else (the batcher, the room loop, paste-back,
the lip-sync check, profiles) is shared: `base` says what an adapter provides.
"""
