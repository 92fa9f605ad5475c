"""Training: the configuration (`_config`, `_settings`, `_fields`), the model it builds
(`_build`), the train state and step (`_state`, `_optimizer`, `_step`), the run directory
(`_run_dir`), the loop (`_prepare`, `_loop`) and loading a trained run (`_load`).

Modules import from the submodules directly; `nfdm_de/__init__.py` re-exports the public names."""
