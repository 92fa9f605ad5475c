"""nfdm-de: Neural Flow Diffusion Models in JAX."""

import importlib.metadata

from ._bridge import (
    BridgeModel as BridgeModel,
    BridgePredictor as BridgePredictor,
    ConditionedBridge as ConditionedBridge,
    NeuralBridge as NeuralBridge,
    bridge_loss as bridge_loss,
    bridge_predictor as bridge_predictor,
    bridge_reconstruction_nll as bridge_reconstruction_nll,
    bridge_sample as bridge_sample,
    neural_bridge as neural_bridge,
)
from ._checkpoint import (
    latest_checkpoint as latest_checkpoint,
    list_checkpoints as list_checkpoints,
    load_checkpoint as load_checkpoint,
    read_header as read_header,
    save_checkpoint as save_checkpoint,
)
from ._data._densities import (
    DATASETS as DATASETS,
    AbstractDataset as AbstractDataset,
    Checkerboard as Checkerboard,
    Digits as Digits,
    EightGaussians as EightGaussians,
    GaussianMixture10D as GaussianMixture10D,
    Rings as Rings,
    Spirals as Spirals,
    TwoMoons as TwoMoons,
    digits_split as digits_split,
    get_dataset as get_dataset,
    true_nll as true_nll,
)
from ._data._images import (
    ImageData as ImageData,
    as_uint8_images as as_uint8_images,
    figure_format as figure_format,
    load_digits_images as load_digits_images,
    read_cifar10 as read_cifar10,
    read_cifar10_batch as read_cifar10_batch,
    read_idx as read_idx,
    read_idx_images as read_idx_images,
    read_images as read_images,
    read_npy_images as read_npy_images,
    read_npz_images as read_npz_images,
    save_figure as save_figure,
    save_image_grid as save_image_grid,
)
from ._data._loading import (
    IMAGE_DATASETS as IMAGE_DATASETS,
    dataset_num_levels as dataset_num_levels,
    is_dataset_name as is_dataset_name,
    is_file_reference as is_file_reference,
    is_image_source as is_image_source,
    load_dataset as load_dataset,
    load_images as load_images,
    load_labels as load_labels,
)
from ._data._stream import (
    BatchStream as BatchStream,
    batch_dataset as batch_dataset,
)
from ._data._transform import (
    AffineDataTransform as AffineDataTransform,
    dequantise as dequantise,
)
from ._evaluate import (
    NLLMethod as NLLMethod,
    NLLResult as NLLResult,
    check_evaluation as check_evaluation,
    check_examples as check_examples,
    check_labels as check_labels,
    default_evaluation_trace as default_evaluation_trace,
    default_nll_method as default_nll_method,
    evaluate_nll as evaluate_nll,
)
from ._files import atomic_write as atomic_write
from ._flow import (
    NeuralFlow as NeuralFlow,
    neural_flow as neural_flow,
)
from ._forward import (
    AbstractForwardProcess as AbstractForwardProcess,
    AbstractGaussianForwardProcess as AbstractGaussianForwardProcess,
    AnchorChoice as AnchorChoice,
    LearnedSchedule as LearnedSchedule,
    LinearInterpolant as LinearInterpolant,
    NeuralGaussian as NeuralGaussian,
    VariancePreserving as VariancePreserving,
    neural_gaussian as neural_gaussian,
)
from ._likelihood import (
    Dequantization as Dequantization,
    Estimate as Estimate,
    bits_per_dim as bits_per_dim,
    log_likelihood as log_likelihood,
    variational_bound as variational_bound,
)
from ._loss import (
    LossBreakdown as LossBreakdown,
    curvature as curvature,
    example_loss as example_loss,
    importance_times as importance_times,
    loss as loss,
    prior_kl as prior_kl,
    stratified_times as stratified_times,
)
from ._metrics import energy_distance as energy_distance, mmd as mmd
from ._ml import (
    LikelihoodSolve as LikelihoodSolve,
    ode_nll as ode_nll,
    ode_nll_loss as ode_nll_loss,
)
from ._model import NFDM as NFDM, AbstractDiffusionModel as AbstractDiffusionModel
from ._nn import (
    TIME_MAX_FREQUENCY as TIME_MAX_FREQUENCY,
    ContextMLP as ContextMLP,
    FourierInputFeatures as FourierInputFeatures,
    FourierTimeFeatures as FourierTimeFeatures,
    MonotoneUnitInterval as MonotoneUnitInterval,
    Predictor as Predictor,
    PredictorSkipChoice as PredictorSkipChoice,
    TimeConditionedMLP as TimeConditionedMLP,
    mlp_predictor as mlp_predictor,
)
from ._sample import sample as sample, sample_trajectories as sample_trajectories
from ._sharding import (
    data_mesh as data_mesh,
    initialize_distributed as initialize_distributed,
    replicate as replicate,
    shard_batch as shard_batch,
)
from ._solve import (
    ErrorNorm as ErrorNorm,
    SolveStats as SolveStats,
    check_solve_settings as check_solve_settings,
)
from ._terms import (
    AbstractProbeDistribution as AbstractProbeDistribution,
    AbstractTraceEstimator as AbstractTraceEstimator,
    ExactTrace as ExactTrace,
    GaussianProbe as GaussianProbe,
    Hutchinson as Hutchinson,
    RademacherProbe as RademacherProbe,
)
from ._train._build import (
    build_model as build_model,
)
from ._train._config import (
    ForwardChoice as ForwardChoice,
    ModelConfig as ModelConfig,
    OptimConfig as OptimConfig,
    ScheduleChoice as ScheduleChoice,
    TraceChoice as TraceChoice,
    TrainConfig as TrainConfig,
    VolatilityChoice as VolatilityChoice,
)
from ._train._load import (
    LoadedRun as LoadedRun,
    load_run as load_run,
)
from ._train._loop import (
    TrainingDiverged as TrainingDiverged,
    TrainResult as TrainResult,
    train as train,
)
from ._train._optimizer import (
    learning_rate_schedule as learning_rate_schedule,
    make_optimizer as make_optimizer,
    run_schedule as run_schedule,
)
from ._train._progress import (
    ProgressReport as ProgressReport,
    ProgressSink as ProgressSink,
    StreamProgress as StreamProgress,
)
from ._train._run_dir import read_run_config as read_run_config
from ._train._settings import (
    FLAT_SETTINGS as FLAT_SETTINGS,
    resolve_input_octaves as resolve_input_octaves,
    resolve_likelihood_phase as resolve_likelihood_phase,
    resolve_predictor_residual as resolve_predictor_residual,
    update_config as update_config,
)
from ._train._state import (
    TrainState as TrainState,
    init_train_state as init_train_state,
)
from ._train._step import (
    CompiledTrainStep as CompiledTrainStep,
    train_step as train_step,
)
from ._unet import (
    UNet as UNet,
    unet_neural_gaussian as unet_neural_gaussian,
    unet_predictor as unet_predictor,
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

# The public API: what a user builds models from, trains, samples and evaluates with. The other
# names above are the building blocks the command line and the tests use; they may change.
__all__ = [
    # models and processes
    "NFDM",
    "AbstractDiffusionModel",
    "AbstractForwardProcess",
    "AbstractGaussianForwardProcess",
    "LinearInterpolant",
    "VariancePreserving",
    "LearnedSchedule",
    "NeuralGaussian",
    "neural_gaussian",
    "AnchorChoice",
    "NeuralFlow",
    "neural_flow",
    "AbstractVolatility",
    "ConstantVolatility",
    "LearnedVolatility",
    "LinearScheduleVolatility",
    "ZeroVolatility",
    "BridgeModel",
    "neural_bridge",
    # networks
    "Predictor",
    "PredictorSkipChoice",
    "mlp_predictor",
    "TimeConditionedMLP",
    "ContextMLP",
    "UNet",
    "unet_predictor",
    "unet_neural_gaussian",
    # objectives, sampling, likelihood
    "loss",
    "LossBreakdown",
    "bridge_loss",
    "sample",
    "sample_trajectories",
    "bridge_sample",
    "log_likelihood",
    "variational_bound",
    "Estimate",
    "Dequantization",
    "bits_per_dim",
    "ErrorNorm",
    "ExactTrace",
    "Hutchinson",
    "SolveStats",
    "evaluate_nll",
    "NLLMethod",
    "NLLResult",
    "mmd",
    "energy_distance",
    # training and runs
    "train",
    "TrainConfig",
    "ProgressReport",
    "ProgressSink",
    "StreamProgress",
    "ModelConfig",
    "OptimConfig",
    "ForwardChoice",
    "VolatilityChoice",
    "ScheduleChoice",
    "TraceChoice",
    "TrainResult",
    "TrainingDiverged",
    "build_model",
    "load_run",
    "LoadedRun",
    # data
    "load_dataset",
    "load_labels",
    "digits_split",
    "get_dataset",
    "true_nll",
    "AbstractDataset",
    "read_images",
    "save_image_grid",
    "data_mesh",
]
