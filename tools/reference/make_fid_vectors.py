#!/usr/bin/env python3
"""Reference values for esddpm's Frechet distance (FID) computation.

FID between two sets of feature vectors, as pytorch-fid computes it:

    FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))

with the unbiased sample covariances (numpy.cov, rowvar=False) and scipy.linalg.sqrtm
(real part). Writes tests/data/fid.json: a few pairs of seeded Gaussian feature sets of
different sizes and dimensions and their FID, computed in float64.

Usage: python tools/reference/make_fid_vectors.py [--out PATH]
Needs numpy and scipy (pinned in requirements.txt).
"""
import argparse
import json
import os

import numpy as np
from scipy import linalg


def fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "data", "fid.json"))
    args = p.parse_args()
    rng = np.random.RandomState(7)
    cases = []
    for n1, n2, d, shift, scale in [(100, 80, 8, 0.5, 1.3), (60, 60, 16, 0.0, 1.0), (150, 50, 4, 2.0, 0.5)]:
        mix = rng.randn(d, d) * 0.3
        a = rng.randn(n1, d).astype(np.float32)
        b = (rng.randn(n2, d).dot(np.eye(d) + mix) * scale + shift).astype(np.float32)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        cases.append({"dim": d, "a": a.ravel().tolist(), "b": b.ravel().tolist(), "fid": fid(a64, b64),
                      "fid_same": fid(a64, a64)})
    out = os.path.normpath(args.out)
    with open(out, "w") as f:
        json.dump({"generator": "tools/reference/make_fid_vectors.py (numpy + scipy.linalg.sqrtm)",
                   "cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out}: " + ", ".join(f"{c['fid']:.6f}" for c in cases))


if __name__ == "__main__":
    main()
