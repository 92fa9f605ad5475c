"""nfdm-de: Neural Flow Diffusion Models in JAX."""

import importlib.metadata

from ._flow import (
    NeuralFlow as NeuralFlow,
    neural_flow as neural_flow,
)
from ._forward import (
    AbstractForwardProcess as AbstractForwardProcess,
    AbstractGaussianForwardProcess as AbstractGaussianForwardProcess,
    LearnedSchedule as LearnedSchedule,
    LinearInterpolant as LinearInterpolant,
    NeuralGaussian as NeuralGaussian,
    VariancePreserving as VariancePreserving,
    neural_gaussian as neural_gaussian,
)
from ._loss import (
    LossBreakdown as LossBreakdown,
    curvature as curvature,
    example_loss as example_loss,
    loss as loss,
    prior_kl as prior_kl,
    stratified_times as stratified_times,
)
from ._model import NFDM as NFDM
from ._nn import (
    FourierTimeFeatures as FourierTimeFeatures,
    MonotoneUnitInterval as MonotoneUnitInterval,
    Predictor as Predictor,
    TimeConditionedMLP as TimeConditionedMLP,
    mlp_predictor as mlp_predictor,
)
from ._volatility import (
    AbstractVolatility as AbstractVolatility,
    ConstantVolatility as ConstantVolatility,
    LearnedVolatility as LearnedVolatility,
    LinearScheduleVolatility as LinearScheduleVolatility,
    ZeroVolatility as ZeroVolatility,
)

try:
    __version__ = importlib.metadata.version("nfdm-de")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
