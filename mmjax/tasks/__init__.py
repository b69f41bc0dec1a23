"""Tasks: the glue between a data set, a model, its loss and its metrics (see `mmjax.train.tasks`).

Importing this package registers every task in `mmjax.train.tasks.TASKS`.
"""

from mmjax.tasks import vqa  # noqa: F401
