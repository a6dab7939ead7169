"""Face detection (MTCNN) and five-point alignment of raw photos."""
