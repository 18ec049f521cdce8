"""The device: onnxruntime sessions on the chosen provider (`onnx`), the one device
thread every room's inference goes through (`engine`), the pure cross-room batching
policy it follows (`batching`), the pipeline's model stages (`pipeline`), and the
latency curves measured at start-up (`profile`, `timing`)."""
