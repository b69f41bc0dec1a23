"""Tasks: the glue between a data set, a model, its loss and its metrics (see `mmjax.train.tasks`).

Importing this package registers every task in `mmjax.train.tasks.TASKS`:
"vqa_sort_of_clevr", "caption_shapes", "clip_shapes" and "av_digits".
"""

from mmjax.tasks import av_digits, caption, clip, vqa  # noqa: F401
