"""Encoders that embed normalised crops: pixel, (later) ONNX CLIP and Zernike; see ``models.base``."""
