"""The run: the stages of ``train.py`` over one :class:`~hmqsearch.run.state.RunState`
(:mod:`hmqsearch.run.stages`), its summary (:mod:`hmqsearch.run.summary`), the export of a
finished run (:mod:`hmqsearch.run.export_stage`) and the loader of a finished run's directory
(:mod:`hmqsearch.run.load`).  Run directories are known here and above, not in ``export/`` or
the layers below it (docs/architecture.md, "The package's layers").
"""
