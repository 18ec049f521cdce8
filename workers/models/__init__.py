"""Model folder handling: the reference ONNX models this project builds itself,
the default avatar image, and the one loader every model goes through."""
