"""Predictors: TransUNet, UltraRefiner, and `refine` over folders."""
