"""A real RTMP ingest for tests: nginx with the rtmp module (Debian's nginx and
libnginx-mod-rtmp), started in a temporary folder on a free loopback port,
recording every published stream to FLV."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

MODULE_PATHS = (Path("/usr/lib/nginx/modules/ngx_rtmp_module.so"),
                Path("/usr/lib64/nginx/modules/ngx_rtmp_module.so"))


def nginx_binary() -> str | None:
    # Debian puts nginx in /usr/sbin, which is not on every user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def available() -> str | None:
    """None if an RTMP ingest can be started here, else why not."""
    if nginx_binary() is None:
        return "nginx is not installed (apt-get install nginx libnginx-mod-rtmp)"
    if not any(p.exists() for p in MODULE_PATHS):
        return "the nginx rtmp module is not installed (apt-get install libnginx-mod-rtmp)"
    return None


class RtmpIngest:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.record_dir = root / "rec"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RtmpIngest:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        module = next(p for p in MODULE_PATHS if p.exists())
        conf = self.root / "nginx.conf"
        conf.write_text(f"""
load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {self.root}/nginx.pid;
error_log {self.root}/logs/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{self.port};
        application live {{
            live on;
            record all;
            record_path {self.record_dir};
        }}
    }}
}}
""")
        self._proc = subprocess.Popen([nginx_binary() or "nginx", "-p", str(self.root), "-c", str(conf),
                                       "-e", str(self.root / "logs" / "error.log")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.root / 'logs' / 'error.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)  # polling the port with a deadline
        raise RuntimeError("nginx rtmp ingest did not start listening")

    def url(self, stream: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{stream}"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
