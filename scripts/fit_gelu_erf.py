#!/usr/bin/env python3
"""Coefficients of the f32 erf GELU in crates/tuna-kernels/src/ops/gelu/fast.rs (no dependencies).

Chebyshev interpolation (near-minimax) in f64 at 200 Chebyshev nodes, truncated, converted exactly
(fractions) to monomials in the mapped variable v in [-1, 1], printed rounded to f32:

  A: erf(z)/z as a degree-5 polynomial in v = 2 z^2 / ZA^2 - 1, z^2 in [0, ZA^2], ZA = 0.75
  B: erfcx(t) = exp(t^2) erfc(t) as a degree-9 polynomial in v, w = 1/(1 + P t) mapped from
     [1/(1 + P TMAX), 1/(1 + P ZA)] to [-1, 1], t in [ZA, TMAX], P = 0.5, TMAX = 9.5

and the fits' own maximum relative error over a fine grid (f64 evaluation).
"""
import math
import struct
from fractions import Fraction

ZA, TMAX, P = 0.75, 9.5, 0.5


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


def erf_over_z(u):
    z = math.sqrt(u)
    return math.erf(z) / z if z > 0 else 2 / math.sqrt(math.pi)


def erfcx_of_w(w):
    t = (1 / w - 1) / P
    return math.erfc(t) * math.exp(t * t)


UA = ZA * ZA
A = cheb_fit(erf_over_z, 0, UA, 5)
err_a = max(abs(poly(A, 2 * u / UA - 1) - erf_over_z(u)) / erf_over_z(u) for u in (UA * i / 4000 for i in range(4001)))
wlo, whi = 1 / (1 + P * TMAX), 1 / (1 + P * ZA)
B = cheb_fit(erfcx_of_w, wlo, whi, 9)
err_b = 0.0
for i in range(4001):
    w = 1 / (1 + P * (ZA + (TMAX - ZA) * i / 4000))
    ref = erfcx_of_w(w)
    err_b = max(err_b, abs(poly(B, (2 * w - wlo - whi) / (whi - wlo)) - ref) / ref)

print(f"A: v = z^2 * {2 / UA!r} - 1; max relative error {err_a:.2e}")
print("   [" + ", ".join("%.9e" % f32(c) for c in A) + "]")
print(f"B: v = w * {2 / (whi - wlo)!r} + {-(wlo + whi) / (whi - wlo)!r}; max relative error {err_b:.2e}")
print("   [" + ", ".join("%.9e" % f32(c) for c in B) + "]")
