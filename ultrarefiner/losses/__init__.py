from .refiner_loss import RefinerLoss as RefinerLoss
from .refiner_loss import curriculum_weights as curriculum_weights
from .ultra_loss import UltraRefinerLoss as UltraRefinerLoss
