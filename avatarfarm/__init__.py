"""avatarfarm: a render farm for AI avatar livestreams.

``avatarfarm.v1`` holds the generated gRPC/protobuf code (``make proto``);
``avatarfarm.domain`` the enums and values both planes share; the CLI lives in
``farm.cli``.
"""

__version__ = "0.1.0"
