"""Tasks: the glue between a data set, a model, its loss and its metrics (see `mmjax.train.tasks`).

`mmjax.train.tasks.TASKS` imports these modules on its first lookup: "caption_shapes",
"clip_shapes" and "av_digits". Projects register their own tasks, which configs name as
"package.module:key" (e.g. "mmjax.projects.sort_of_clevr.task:vqa_sort_of_clevr").
"""
