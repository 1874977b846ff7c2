#!/usr/bin/env python3
"""Generate tests/golden/cities_golden.csv with Uber's reference H3 (PyPI h3 4.x).

Deterministic: no randomness. Selection (in source order, i.e. by population,
deduplicated by geonameid):
  * the TOP_N most populous cities,
  * every STRIDE-th city of the remainder (even stride through the long tail),
  * every city with |lat| > 60 (high latitudes),
  * every city with |lng| > 170 (near the antimeridian).

Owning cell at resolution R := cell_to_parent(latlng_to_cell(lat, lng, 15), R).
direct5 = latlng_to_cell(lat, lng, 5) is kept only to show how often it differs.
lat/lng are copied verbatim from the source CSV (strings, not reformatted).
"""
import csv
import os
import sys

import h3

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "data", "cities15000.csv")
OUT = os.path.join(HERE, "cities_golden.csv")

TOP_N = 400
STRIDE = 34
PARENT_RES = (0, 2, 3, 5, 7)
HEADER = ["geonameid", "name", "country", "lat", "lng", "cell15"] + [
    "parent%d" % r for r in PARENT_RES
] + ["direct5"]


def main():
    with open(SRC, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    selected = []
    seen = set()
    for i, r in enumerate(rows):
        lat, lng = float(r["lat"]), float(r["lng"])
        take = (
            i < TOP_N
            or (i - TOP_N) % STRIDE == 0
            or abs(lat) > 60.0
            or abs(lng) > 170.0
        )
        if take and r["geonameid"] not in seen:
            seen.add(r["geonameid"])
            selected.append(r)

    mismatches = 0
    with open(OUT, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(HEADER)
        for r in selected:
            lat, lng = float(r["lat"]), float(r["lng"])
            cell15 = h3.latlng_to_cell(lat, lng, 15)
            parents = [h3.cell_to_parent(cell15, res) for res in PARENT_RES]
            direct5 = h3.latlng_to_cell(lat, lng, 5)
            if direct5 != parents[PARENT_RES.index(5)]:
                mismatches += 1
            w.writerow(
                [r["geonameid"], r["name"], r["country"], r["lat"], r["lng"], cell15]
                + parents
                + [direct5]
            )

    versions = h3.versions() if hasattr(h3, "versions") else {}
    print(
        "points=%d h3.__version__=%s h3.versions()=%s direct5!=parent5=%d (%.2f%%)"
        % (
            len(selected),
            h3.__version__,
            versions,
            mismatches,
            100.0 * mismatches / max(1, len(selected)),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
