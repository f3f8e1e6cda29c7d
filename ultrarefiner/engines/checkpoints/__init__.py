"""Training run files (resume, best weights, run identity) and the refiner checkpoint format."""
