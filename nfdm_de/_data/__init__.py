"""Data: the built-in sets with exact densities (`_densities`), loading and checking files and
images (`_loading`, `_images`), the data <-> model transform (`_transform`) and the batch
stream (`_stream`).

Model space: the networks see standardised data `z = to_model(x)`. The `AffineDataTransform` is
fitted on the training data only and stored in the run, so samples and NLLs map back to the
data's own units: `nll_data = nll_model - transform.log_det()`."""
