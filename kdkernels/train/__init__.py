"""The reference trainer: ``python -m kdkernels.train`` (or ``kdkernels-train``).

A thin, readable loop that distils a teacher into a student through kdkernels' public losses and
compares it with the same student trained without a teacher. See ``kdkernels-train --help``.
The entry point is ``kdkernels.train.__main__.main``.
"""
