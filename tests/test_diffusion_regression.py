"""
Faithfulness without ../shared: exact corners of the reference's outputs
(tests/data/reference_slices.pt, cut by tests/data/make_reference_slices.py).
"""

import pathlib

import torch

from golden_compare import case_label, check_case

SLICES = pathlib.Path(__file__).with_name("data") / "reference_slices.pt"


def test_reference_slices():
    cases = torch.load(SLICES, weights_only=True)
    assert len(cases) >= 30 and any("ddim_sample_loop" in c["expected"] for c in cases)
    for i, case in enumerate(cases):
        check_case(case, case_label(i, case))
