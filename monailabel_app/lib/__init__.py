"""Infer and train tasks of the UltraRefiner MONAI Label app."""

from .environment import check_dependencies

# before lib.infers/lib.trainers import ultrarefiner: a missing package is named here, not by a later AttributeError
check_dependencies()
