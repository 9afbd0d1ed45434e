"""The one quantization pipeline: a :class:`~lowbit.pipeline.recipe.Recipe` applied to a loaded model."""
