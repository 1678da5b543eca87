"""The project's own error type: every bad input ends here, naming study, file and fix."""

from __future__ import annotations


class ScgrnInputError(ValueError):
    """Bad input (a file, a catalog entry, a study) that the user can fix.

    The message names the study, the file and what to do, e.g.
    ``GSE98969: GSM2629430_AB1.txt.gz line 1043 has 5 fields, expected 1+384; re-download or exclude the sample``.
    """

    def __init__(self, problem: str, *, study: str | None = None, file: str | None = None, fix: str | None = None):
        self.problem = problem
        self.study = study
        self.file = file
        self.fix = fix
        where = ": ".join(part for part in (study, file) if part)
        message = f"{where}: {problem}" if where else problem
        if fix:
            message = f"{message}; {fix}"
        super().__init__(message)
