"""Training: experiment configs, training data, the per-worker loop and its launch on Ray Train
or in this process. Nothing is imported here; import the module you need.

Modules:

- :mod:`~pipeline.training.config`: the experiment config as typed dataclasses, ``load_config``
  (YAML, command-line overrides, validation, :class:`~pipeline.training.config.ConfigError`) and
  the per-launch ``RunOptions``.
- :mod:`~pipeline.training.data`: training sources, bundled scikit-image photos, Ray Data loading,
  patch sampling and augmentation.
- :mod:`~pipeline.training.degrade`: synthetic degradations (noise, low light, SR, JPEG).
- :mod:`~pipeline.training.synthetic`: procedural dead-leaves training images.
- :mod:`~pipeline.training.loop`: one worker's training loop (``Trainer``), the schedule (``lr_at``),
  the loss and the export of the trained model.
- :mod:`~pipeline.training.validation`: validation pairs and their PSNR/SSIM during training.
- :mod:`~pipeline.training.run_store`: the run folder (checkpoints, metrics, config, report, crops).
- :mod:`~pipeline.training.launch`: ``run_training`` on the Ray Train or the inline executor.
"""
