"""
The published configurations build the reference's exact state-dict layout,
checked against digests of the golden listings kept in tests/data (so every
checkout runs this, with or without ../shared).
"""

import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))
from make_released_key_digests import listing_digest  # noqa: E402
from test_script_util import build, parse_flags  # noqa: E402

DIGESTS = json.loads((pathlib.Path(__file__).parent / "data" / "released_unet_keys.json").read_text())


def test_released_configurations_match_the_listing_digests():
    assert len(DIGESTS) == 5
    for name, expected in DIGESTS.items():
        argv = expected["flags"]
        with torch.device("meta"):
            model = build(parse_flags(argv, "--large_size" in argv))
        lines = [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()]
        assert len(lines) == expected["keys"], name
        assert listing_digest(lines) == expected["sha256"], name
        assert sum(p.numel() for p in model.parameters()) == expected["parameters"], name
