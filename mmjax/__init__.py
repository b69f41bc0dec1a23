"""mmjax: a JAX/Flax NNX model zoo for multimodal learning."""

__version__ = "0.1.0"
