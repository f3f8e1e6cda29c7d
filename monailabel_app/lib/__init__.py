"""Infer and train tasks of the UltraRefiner MONAI Label app."""
