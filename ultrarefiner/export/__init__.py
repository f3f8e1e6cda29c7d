"""Deployment exports: ONNX graphs of TransUNet and of the SAM refiner (``ultrarefiner.export.onnx``)."""
