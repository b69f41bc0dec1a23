"""Preprocessing ops per modality, composable from pp strings.

  preprocess = pp.parse("image.decode|image.resize(64)|image.value_range(-1, 1)|"
                        "text.tokenize(32, 'path/to/tokenizer.json', key='question')")
  example = preprocess(example, np.random.default_rng(0))

Ops are listed by `pp.PP_OPS.names()` (registered by the modules `audio`, `image`, `multimodal`, `text`
and `registry`); see `registry` for the string syntax and error handling.
"""

from mmjax.data.pp.multimodal import mixup
from mmjax.data.pp.registry import (
    PP_OPS,
    BadExample,
    Preprocess,
    SkipExample,
    parse,
    record_name,
    register,
)

__all__ = ["PP_OPS", "BadExample", "Preprocess", "SkipExample", "mixup", "parse", "record_name",
           "register"]
