"""UltraRefiner: TransUNet coarse segmentation refined by a SAM/MedSAM refiner, trained end to end."""

__version__ = "0.1.0"

__all__ = ["create_model"]


def __getattr__(name: str):
    """``ultrarefiner.create_model`` (``hub.create_model``, the one way from a file to a model), imported on first
    use so that ``import ultrarefiner`` stays light."""
    if name == "create_model":
        from ultrarefiner.hub import create_model

        return create_model
    raise AttributeError(f"module 'ultrarefiner' has no attribute {name!r}")
