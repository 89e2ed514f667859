"""One module per public dataset format; importing this package registers them all."""

from medistill.data.formats import phantom  # noqa: F401
from medistill.data.formats import cbis_ddsm, med_grit, mimic_cxr, mini_mias, nih_cxr  # noqa: F401
from medistill.data.formats import pathvqa, slake, vqa_med_2019, vqa_rad  # noqa: F401
from medistill.data.formats.base import FORMATS, Problem, Reader, open_dataset, register_format

__all__ = ["FORMATS", "Problem", "Reader", "open_dataset", "register_format"]
