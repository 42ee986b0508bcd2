"""rakt: retrieval-augmented knowledge transfer. One import name for the whole tool:

- rakt.cli, rakt.stages, rakt.run, rakt.report, rakt.rundir: the app (the `rakt` command, the stage registry,
  `rakt run` and its report);
- rakt.pipeline: the data stages (embed, index, retrieve, curate, download, materialize, ...) and the contracts;
- rakt.distill: the teacher, the distillation and training stages, evaluation and export;
- rakt.indexes: the index backends (FAISS, exact torch search) behind one protocol.
"""
