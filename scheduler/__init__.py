"""avatarfarm scheduler: the control plane that admits rooms and places them on workers."""
