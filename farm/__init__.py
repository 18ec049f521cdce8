"""The entry points above both planes: the ``avatarfarm`` command line, the demo and
the local farm (scheduler and workers as child processes). Nothing in ``scheduler``,
``workers`` or ``avatarfarm`` imports this package."""
