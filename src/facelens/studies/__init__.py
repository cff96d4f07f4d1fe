"""Dataset-level studies on real photos: anonymization, one-shot recognition, psychophysics, bias.

Each study module registers itself with :func:`facelens.studies.base.register_study`; the CLI
(``facelens audit <study>``) and the report find them in :data:`facelens.studies.base.STUDIES`.
"""

from .base import STUDIES, StudyResult, StudySpec, load_studies, register_study

__all__ = ["STUDIES", "StudyResult", "StudySpec", "load_studies", "register_study"]
