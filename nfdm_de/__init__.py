"""nfdm-de: Neural Flow Diffusion Models in JAX."""

import importlib.metadata

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
from ._likelihood import (
    Dequantization as Dequantization,
    Estimate as Estimate,
    bits_per_dim as bits_per_dim,
    log_likelihood as log_likelihood,
    variational_bound as variational_bound,
)
from ._metrics import energy_distance as energy_distance, mmd as mmd
from ._model import NFDM as NFDM
from ._nn import (
    FourierTimeFeatures as FourierTimeFeatures,
    MonotoneUnitInterval as MonotoneUnitInterval,
    Predictor as Predictor,
    TimeConditionedMLP as TimeConditionedMLP,
    mlp_predictor as mlp_predictor,
)
from ._sample import sample as sample, sample_trajectories as sample_trajectories
from ._solve import SolveStats as SolveStats
from ._terms import (
    AbstractProbeDistribution as AbstractProbeDistribution,
    AbstractTraceEstimator as AbstractTraceEstimator,
    ExactTrace as ExactTrace,
    GaussianProbe as GaussianProbe,
    Hutchinson as Hutchinson,
    RademacherProbe as RademacherProbe,
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
