#!/usr/bin/env python3
"""Writes the assignment blocks of shard-maps/continents.toml and shard-maps/demo.toml.

Rule: each of the 122 resolution-0 H3 cells goes to the shard of its center's longitude band
(Americas: lng < -25; Europe+Africa: -25 <= lng < 60; Asia+Oceania: otherwise). The demo map
assigns only the base cells that contain a city of tests/data/cities15000.csv and leaves the
rest (mostly ocean) to hash fallback. Needs PyPI h3 4.x (see tests/golden/README.md).
Usage: python3 tools/gen_continent_maps.py  (prints the blocks; paste them into the maps)
"""
import csv
import os

import h3

here = os.path.dirname(os.path.abspath(__file__))


def shard_of(cell):
    lat, lng = h3.cell_to_latlng(cell)
    if lng < -25:
        return "am-1"
    if lng < 60:
        return "eu-1"
    return "as-1"


base = sorted(h3.get_res0_cells())
with open(os.path.join(here, "..", "tests", "data", "cities15000.csv"), newline="", encoding="utf-8") as f:
    inhabited = {h3.cell_to_parent(h3.latlng_to_cell(float(r["lat"]), float(r["lng"]), 15), 0) for r in csv.DictReader(f)}


def blocks(cells):
    out = []
    for shard in ("am-1", "eu-1", "as-1"):
        mine = [c for c in cells if shard_of(c) == shard]
        out.append(f'[[assign]]\nshard = "{shard}"\ncells = [\n' + "".join(f'  "{c}",\n' for c in mine) + "]\n")
    return "\n".join(out)


print("# ---- continents.toml (all 122) ----")
print(blocks(base))
print("# ---- demo.toml (inhabited base cells: %d) ----" % len([c for c in base if c in inhabited]))
print(blocks([c for c in base if c in inhabited]))
