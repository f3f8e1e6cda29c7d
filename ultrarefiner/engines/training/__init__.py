"""Training steps, per-phase set-up and training handlers.

``step`` holds the one training step and evaluation step every phase runs (AMP, clipping, the non-finite skip,
MONAI's events); each phase adds only its hook: ``inferer_step`` (phase 1, TransUNet), ``refiner_training`` (phase 2),
``e2e_training`` (phase 3). ``bundle_engines`` builds a bundle's own trainer or evaluator in-process (tests,
benchmarks).
"""
