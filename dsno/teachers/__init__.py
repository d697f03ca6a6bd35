"""Teachers: a schedule plus a denoiser with a declared parameterization (eps / x0 / v)."""

from dsno.teachers.base import PREDICTIONS, Teacher, WrappedTeacher, convert, wrap
from dsno.teachers.gmm import GaussianMixture

__all__ = ["PREDICTIONS", "Teacher", "WrappedTeacher", "GaussianMixture", "convert", "wrap"]
