"""avatarfarm workers: the data plane that renders, encodes and pushes avatar streams."""
