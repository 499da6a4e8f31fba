"""
Write tests/data/released_unet_keys.json from ../shared/golden/unet_keys: for
each published configuration its flags, parameter count and the SHA-256 of
its state-dict listing, so a checkout without ../shared still checks them.
Run from the repository root: python tests/data/make_released_key_digests.py
"""

import hashlib
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT.parent / "shared" / "golden" / "unet_keys"
TARGET = pathlib.Path(__file__).with_name("released_unet_keys.json")


def listing_digest(lines):
    """SHA-256 of "name (shape)" lines joined by newlines."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def main():
    digests = {}
    for path in sorted(SOURCE.glob("*.txt")):
        first, second, *lines = path.read_text().strip().split("\n")
        digests[path.stem] = {
            "flags": first.removeprefix("# flags:").split(),
            "parameters": int(second.split(":")[1]),
            "keys": len(lines),
            "sha256": listing_digest(lines),
        }
    TARGET.write_text(json.dumps(digests, indent=1) + "\n")
    print(f"wrote {len(digests)} listings to {TARGET}")


if __name__ == "__main__":
    main()
