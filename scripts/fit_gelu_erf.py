#!/usr/bin/env python3
"""Coefficients of the f32 erf GELU in crates/tuna-kernels/src/ops/gelu/fast.rs (no dependencies).

Chebyshev interpolation (near-minimax) in f64 at 200 Chebyshev nodes, truncated, converted exactly
(fractions) to monomials in the mapped variable v in [-1, 1], printed rounded to f32:

  R: erfcx(t) = exp(t^2) erfc(t) as a degree-10 polynomial in v, w = 1/(1 + P t) mapped from
     [1/(1 + P TMAX), 1] to [-1, 1], t in [0, TMAX], P = 0.4, TMAX = 9.5

and the fit's own maximum relative error over a fine grid (f64 evaluation).
"""
import math
import struct
from fractions import Fraction

TMAX, P, DEG = 9.5, 0.4, 10


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def cheb_fit(f, a, b, deg, nodes=200):
    """Monomial coefficients (in v, [a, b] mapped to [-1, 1]) of f's Chebyshev interpolant."""
    vs = [math.cos(math.pi * (k + 0.5) / nodes) for k in range(nodes)]
    vals = [f(a + (b - a) * (v + 1) / 2) for v in vs]
    c = [2 * sum(vals[k] * math.cos(math.pi * j * (k + 0.5) / nodes) for k in range(nodes)) / nodes
         for j in range(deg + 1)]
    c[0] /= 2
    T = [[Fraction(1)], [Fraction(0), Fraction(1)]]
    for n in range(2, deg + 1):
        t = [Fraction(0)] * (n + 1)
        for i, x in enumerate(T[n - 1]):
            t[i + 1] += 2 * x
        for i, x in enumerate(T[n - 2]):
            t[i] -= x
        T.append(t)
    mono = [Fraction(0)] * (deg + 1)
    for j in range(deg + 1):
        for i, x in enumerate(T[j]):
            mono[i] += Fraction(c[j]) * x
    return [float(m) for m in mono]


def poly(cs, v):
    return sum(c * v**k for k, c in enumerate(cs))


def erfcx_of_w(w):
    t = max(0.0, (1 / w - 1) / P)
    return math.erfc(t) * math.exp(t * t)


wlo, whi = 1 / (1 + P * TMAX), 1.0
R = cheb_fit(erfcx_of_w, wlo, whi, DEG)
err = 0.0
for i in range(8001):
    w = 1 / (1 + P * TMAX * i / 8000)
    ref = erfcx_of_w(w)
    err = max(err, abs(poly(R, (2 * w - wlo - whi) / (whi - wlo)) - ref) / ref)

print(f"R: v = w * {2 / (whi - wlo)!r} + {-(wlo + whi) / (whi - wlo)!r}; max relative error {err:.2e}")
print("   [" + ", ".join("%.9e" % f32(c) for c in R) + "]")
