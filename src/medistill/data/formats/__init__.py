"""One module per public dataset format; importing this package registers them all."""

from medistill.data.formats import phantom  # noqa: F401
from medistill.data.formats import captions  # noqa: F401
from medistill.data.formats import cbis_ddsm  # noqa: F401
from medistill.data.formats import med_grit  # noqa: F401
from medistill.data.formats import mimic_cxr  # noqa: F401
from medistill.data.formats import mini_mias  # noqa: F401
from medistill.data.formats import nih_cxr  # noqa: F401
from medistill.data.formats import pathvqa  # noqa: F401
from medistill.data.formats import slake  # noqa: F401
from medistill.data.formats import vqa_med_2019  # noqa: F401
from medistill.data.formats import vqa_rad  # noqa: F401
from medistill.data.formats.base import FORMATS, Problem, Reader, open_dataset, register_format

__all__ = ["FORMATS", "Problem", "Reader", "open_dataset", "register_format"]
