"""Projects built on the library, one folder each (as in scenic's `projects/`).

A project keeps what is specific to one line of work: its model pieces (registered in the
library's registries and named in configs as "mmjax.projects.<name>.<module>:<key>"), its task,
configs, benchmark scripts and a README with its results. The library never imports a project.
"""
