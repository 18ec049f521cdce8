"""Model families that redraw a prepared video avatar's face from speech.

A family is what a model folder's manifest (or an avatar bundle) declares, plus one
adapter module here: how a room's audio becomes each frame's audio input
(`FaceSpeech`), how its models are bound and fed, and a ``load(folder, ctx)`` that
gives its `FamilyRuntime` on a worker (`base`). Everything else (the batcher, the room
loop, paste-back, the lip-sync check, profiles, placement) is shared. A new family is
its adapter module, listed in `workers.device.pipeline.FAMILIES`, and its manifest
entry; `hubert` and `rows` hold what the families fed by learnt audio features share.
"""
