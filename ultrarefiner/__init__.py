"""UltraRefiner: TransUNet coarse segmentation refined by a SAM/MedSAM refiner, trained end to end."""

__version__ = "0.1.0"
