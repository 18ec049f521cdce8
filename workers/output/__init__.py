"""Where frames go: H.264/AAC encoding with PyAV (`encode`), output targets (file,
HLS folder, RTMP URL) and how a moved room continues one (`targets`), HLS publishing
from a private staging folder (`hls`), and the fence that keeps a superseded writer
off the public files (`fence`)."""
