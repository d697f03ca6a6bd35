"""Teachers: a schedule plus a denoiser with a declared parameterization (eps / x0 / v / flow_velocity);
ConditionalGaussianMixture: the exact class-conditional mixture (labels, classifier-free guidance);
PSLDGaussianMixture: the exact score of the augmented PSLD process (z = (x, m)); PSLDUNetTeacher: a
PSLD score network."""

from dsno.teachers.base import PREDICTIONS, Teacher, WrappedTeacher, convert, wrap
from dsno.teachers.diffusers import DiffusersEDMTeacher, DiffusersFlowTeacher, DiffusersTeacher, load_diffusers_teacher
from dsno.teachers.gmm import GaussianMixture
from dsno.teachers.gmm_cond import ConditionalGaussianMixture
from dsno.teachers.psld_gmm import PSLDGaussianMixture
from dsno.teachers.psld_unet import PSLDUNetTeacher, load_psld_unet_teacher
from dsno.teachers.unet import UNetTeacher, load_unet_teacher

__all__ = ["PREDICTIONS", "Teacher", "WrappedTeacher", "GaussianMixture", "ConditionalGaussianMixture",
           "PSLDGaussianMixture", "PSLDUNetTeacher", "UNetTeacher", "DiffusersTeacher", "DiffusersEDMTeacher", "DiffusersFlowTeacher", "convert", "wrap",
           "load_unet_teacher", "load_diffusers_teacher", "load_psld_unet_teacher"]
