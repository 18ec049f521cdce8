"""Avatar preparation: a person's base video (or one image) turned once into what the
model families need per frame. `faces` finds and tracks the face; the bundle format
and the per-family crops build on it."""
