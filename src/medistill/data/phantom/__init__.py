"""The phantom world: a deterministic synthetic medical dataset, medistill's default data and measuring instrument.

Images of four modalities with exactly known findings (masks, boxes, locations, sizes), plus the
privileged modalities that describe them (reports, clinical tables), VQA pairs and grounding
conversations, written in the public datasets' own layouts. See docs/phantom.md.
"""

from medistill.data.phantom.case import PhantomCase, generate_case
from medistill.data.phantom.findings import Finding
from medistill.data.phantom.knobs import PhantomKnobs
from medistill.data.phantom.spec import CXR_FINDINGS, MODALITIES
from medistill.data.phantom.writer import write_phantom

__all__ = ["CXR_FINDINGS", "MODALITIES", "Finding", "PhantomCase", "PhantomKnobs", "generate_case", "write_phantom"]
