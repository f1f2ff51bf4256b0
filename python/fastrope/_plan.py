"""The planner: which method a call runs, what it costs, and why.

The cost model and the choice between the exact and the fast method are native
(``src/plan/cost.rs``, docs/DESIGN.md §10): :func:`make_plan` asks for the exact method's
predicted flops, seconds and working set, for the fast plan (whose dict carries its predicted
seconds), and for the choice with its reasons, and assembles the :class:`Plan`.  The working set
is predicted before anything is allocated: a call that would exceed ``memory_limit`` raises
``MemoryError`` up front.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from . import _fastrope as _native
from ._types import ApproximationError


@dataclass(frozen=True)
class Plan:
    """A plain-data description of what a call will do.

    ``method`` is ``"exact"`` or ``"fast"``; ``degree``, ``poly_kind``, ``bound_r``, ``terms``,
    ``n_alpha``, ``n_beta``, ``n_pairs`` describe the fast method's polynomial and expansion (None
    when it was not considered); ``route`` is the fast route planned (``"toeplitz"`` or
    ``"lowrank"``, None when the fast method was not planned); ``certified_error`` bounds
    ``max|out - exact|`` (0 for exact up to rounding); costs are predicted flops and seconds;
    ``working_set_bytes`` is the memory the chosen method allocates beyond its inputs; ``why``
    says why it was chosen; ``refused`` lists ``(method or route, reason)`` for every
    alternative considered and not taken (``"exact"``, ``"fast"``, ``"toeplitz"``,
    ``"lowrank"``).  ``native`` is the fast plan itself (opaque): :func:`attention` and
    :func:`attention_grad` execute it as it is, without planning again.  On the low-rank route
    ``details["band"]`` shows the window and the ALiBi slope read off the bias table (with the
    table's deviation from ``-s|δ|``), or is None without either.
    """

    method: str
    eps: float
    certified_error: float
    exact_flops: float
    exact_seconds: float
    working_set_bytes: int
    memory_limit: int
    why: str
    fast_flops: Optional[float] = None
    fast_seconds: Optional[float] = None
    fast_working_set_bytes: Optional[int] = None
    degree: Optional[int] = None
    poly_kind: Optional[str] = None
    bound_r: Optional[float] = None
    terms: Optional[int] = None
    n_alpha: Optional[int] = None
    n_beta: Optional[int] = None
    n_pairs: Optional[int] = None
    fast_certified_error: Optional[float] = None
    route: Optional[str] = None
    refused: tuple = ()
    details: dict = field(default_factory=dict, compare=False)
    native: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        lines = [
            f"method: {self.method}  (eps={self.eps:g}, certified error {self.certified_error:.3g})"
        ]
        lines.append(
            f"exact: {self.exact_flops:.3g} flop, ~{self.exact_seconds:.3g} s"
            + (
                f"; fast: {self.fast_flops:.3g} flop, ~{self.fast_seconds:.3g} s"
                if self.fast_flops
                else ""
            )
        )
        if self.degree is not None and self.details.get("path") == "lowrank":
            lines.append(
                f"polynomial: {self.poly_kind} degree {self.degree} on [-R, R],"
                f" R = {self.bound_r:.4g}; {self.terms} low-rank features (no FFT)"
            )
            band = self.details.get("band")
            if band:
                parts = []
                if band["slope"]:
                    parts.append(
                        f"ALiBi slope {band['slope']:.4g} read off the bias table"
                        f" (off -s|δ| by {band['bias_deviation']:.2g})"
                    )
                if band["window"] is not None:
                    parts.append(f"window {tuple(band['window'])}")
                lines.append("band: " + ", ".join(parts) + ", by block states")
        elif self.degree is not None:
            lines.append(
                f"polynomial: {self.poly_kind} degree {self.degree} on [-R, R],"
                f" R = {self.bound_r:.4g};"
                f" {self.terms} terms, {self.n_alpha} α x {self.n_beta} β, {self.n_pairs} pairs"
            )
            spectra = self.details.get("kernel_spectra")
            if spectra and spectra["mode"] == "streamed":
                lines.append(
                    f"kernel spectra: streamed, {spectra['pair_chunk']} of {spectra['n_pairs']}"
                    f" pairs at a time, rebuilt for each tile of {spectra['column_tile']}"
                    " columns (all of them do not fit memory_limit)"
                )
        scale = self.details.get("grad_scale")
        if self.degree is not None and scale is not None:
            named = ", ".join(
                f"{g} {scale[g]:.3g}" for g in ("dq", "dk", "dv", "dw", "dbias") if scale[g]
            )
            if self.details.get("grad_error") == "relative":
                lines.append(
                    f"gradients: max|G_fast - G| <= eps * S_G (relative), certified magnitudes"
                    f" S_G >= max|G|: {named}"
                )
            else:
                lines.append(
                    f"gradients: max|G_fast - G| <= eps (absolute); magnitudes S_G: {named}"
                )
        lines.append(
            f"working set: {_native.format_bytes(self.working_set_bytes)}"
            f" of {_native.format_bytes(self.memory_limit)}"
        )
        lines.append(f"why: {self.why}")
        for what, reason in self.refused:
            lines.append(f"refused {what}: {reason}")
        return "\n".join(lines)


_AVAILABLE_TTL = 0.5  # seconds a reading of MemAvailable is reused
_available_cache: list = [float("-inf"), 0]
if hasattr(os, "register_at_fork"):
    # A forked child reads its own (its parent's reading may predate the fork by up to the TTL).
    os.register_at_fork(after_in_child=lambda: _available_cache.__setitem__(0, float("-inf")))


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux, read at most every 0.5 s: a decode
    step is ~0.1 ms and the read took 45 us), or 8 GiB when unknown."""
    now = time.monotonic()
    if now - _available_cache[0] < _AVAILABLE_TTL:
        return _available_cache[1]
    _available_cache[:] = [now, _read_available_memory()]
    return _available_cache[1]


def _read_available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def resolve_memory_limit(memory_limit: Any) -> int:
    if memory_limit is None:
        return int(0.8 * available_memory())
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, np.integer, float)):
        raise TypeError(
            f"memory_limit: expected a number of bytes or None, got {type(memory_limit).__name__}"
        )
    if not memory_limit > 0:
        raise ValueError(f"memory_limit: expected a positive number of bytes, got {memory_limit!r}")
    return int(memory_limit)


def exact_cost(call, backward: bool) -> tuple:
    """``(flops, seconds, working_set_bytes)`` of the exact method (the native cost model)."""
    return _native.exact_cost(dtype=call.dtype.name, backward=backward, **call.native_args())


def output_rounding(call) -> float:
    """float32 results are rounded once more when the float64 fast result is cast back."""
    if call.dtype != np.float32 or call.v4.size == 0:
        return 0.0
    if call.v_max_given is not None:
        vmax = call.v_max_given
    else:  # max |v| without a v-sized temporary (np.abs would copy v before a refusal)
        vmax = float(np.maximum(call.v4.max(), -call.v4.min()))
    return vmax * 2.0**-24


def kernel_eps(call, eps: float) -> float:
    """The part of ``eps`` left to the float64 fast kernel."""
    return eps - output_rounding(call)


ROUTES = ("auto", "toeplitz", "lowrank")


def check_route(route: Any) -> str:
    """``route=``: None reads ``FASTROPE_FAST_PATH`` (if set), else ``"auto"``."""
    if route is None:
        route = os.environ.get("FASTROPE_FAST_PATH") or "auto"
        if route not in ROUTES:
            raise ValueError(f"FASTROPE_FAST_PATH: expected one of {ROUTES}, got {route!r}")
    if not isinstance(route, str) or route not in ROUTES:
        raise ValueError(f"route: expected one of {ROUTES} or None, got {route!r}")
    return route


def _native_refused(info: dict) -> tuple:
    return tuple((str(r), str(why)) for r, why in info.get("refused", ()))


def _fast_fields(info: dict) -> dict:
    return dict(
        route=str(info["path"]),
        native=info.get("handle"),
        fast_flops=float(info["flops"]),
        fast_seconds=float(info["seconds"]),
        fast_working_set_bytes=int(info["working_bytes"]),
        degree=int(info["degree"]),
        poly_kind=str(info["poly_kind"]),
        bound_r=float(info["bound_r"]),
        terms=int(info["terms"]),
        n_alpha=int(info["n_alpha"]),
        n_beta=int(info["n_beta"]),
        n_pairs=int(info["n_pairs"]),
    )


def make_plan(
    call,
    eps: float,
    method: str,
    memory_limit: Any,
    backward: bool = False,
    fast_probe: Optional[Callable[[float, int], dict]] = None,
) -> Plan:
    """Choose the method for ``call``.

    ``fast_probe(eps_for_kernel, limit)`` returns the native fast plan (a dict) or raises
    :class:`ApproximationError` with the reason it cannot certify ``eps``.
    """
    limit = resolve_memory_limit(memory_limit)
    flops, seconds, ws = exact_cost(call, backward)
    exact = dict(exact_flops=flops, exact_seconds=seconds, memory_limit=limit, eps=eps)
    batch, hq, hk, nq, nk, d, dv = call.shape

    def exact_plan(
        why: str, fast: Optional[dict] = None, refused: tuple = (), fast_reason: str = ""
    ) -> Plan:
        if ws > limit:
            raise MemoryError(
                f"fastrope: the exact method needs a working set of {_native.format_bytes(ws)},"
                f" more than memory_limit = {_native.format_bytes(limit)} (shapes {call.shape})"
            )
        fast = dict(fast or {}, native=None)  # not run: the native plan is not kept
        return Plan(
            method="exact",
            certified_error=0.0,
            working_set_bytes=ws,
            why=why,
            refused=(("fast", fast_reason or why),) + refused,
            **exact,
            **fast,
        )

    if method == "exact":
        return exact_plan("method='exact' was requested")
    if eps == 0.0:
        if method == "fast":
            raise ApproximationError(
                "method='fast': eps = 0 asks for the exact result; the fast method approximates"
                " (pass eps > 0, e.g. eps=1e-3, or method='exact')"
            )
        return exact_plan("eps = 0 asks for the exact result")
    if backward:
        return _plan_backward(call, eps, method, limit, exact, exact_plan, fast_probe)
    if nq == 0 or nk == 0 or batch * hq == 0 or fast_probe is None:
        if method == "fast":
            raise ApproximationError("method='fast': an empty axis leaves nothing to approximate")
        return exact_plan("an empty axis: the exact method is immediate")
    out_rounding = output_rounding(call)
    kernel_eps = eps - out_rounding
    try:
        if kernel_eps <= 0:
            raise ApproximationError(
                f"eps = {eps:.3g} is below the float32 rounding of the output ({out_rounding:.3g})"
            )
        info = fast_probe(kernel_eps, limit)
    except ApproximationError as e:
        if method == "fast":
            raise ApproximationError(f"method='fast': {e}") from None
        return exact_plan(f"the fast method cannot serve this call: {e}")
    fast = _fast_fields(info)
    # When the a-priori bound exceeds eps, each head is certified from its own data before its
    # FFTs run (and refused otherwise): what a result guarantees is then eps.
    certified = min(float(info["certified_error"]), kernel_eps) + out_rounding
    fast["fast_certified_error"] = certified
    details = {
        k: info[k]
        for k in (
            "path",
            "rho",
            "fft_len",
            "groups",
            "support_size",
            "column_tile",
            "kernel_spectra",
            "approximation_error",
            "rounding_error",
            "certified_lse_error",
            "band",
        )
    }
    return _choose(method, eps, limit, certified, fast, details, exact, exact_plan, info)


def _choose(method, eps, limit, certified, fast, details, exact, exact_plan, info) -> Plan:
    """Fast or exact for a call the fast plan ``info`` certifies (the native choice)."""
    refused = _native_refused(info)
    chosen, why, not_taken = _native.choose_method(
        info["handle"],
        method=method,
        eps=eps,
        certified=certified,
        exact_seconds=exact["exact_seconds"],
        memory_limit=limit,
    )
    if chosen == "fast":
        if method == "fast":
            _warn_if_slower(fast, exact["exact_seconds"])
        return Plan(
            method="fast",
            certified_error=certified,
            why=why,
            working_set_bytes=fast["fast_working_set_bytes"],
            details=details,
            refused=(tuple(not_taken),) + refused,
            **exact,
            **fast,
        )
    return exact_plan(why, fast, refused, not_taken[1])


# method='fast' warns when its predicted time is above this many times the exact method's (and
# above SLOWER_MIN_SECONDS): a huge eps on a small call can ask for a degree whose features cost
# seconds where the exact method takes a millisecond.
SLOWER_WARN_RATIO = 100.0
SLOWER_MIN_SECONDS = 0.1


def _warn_if_slower(fast: dict, exact_seconds: float) -> None:
    fs = fast["fast_seconds"]
    if fs < SLOWER_MIN_SECONDS or fs < SLOWER_WARN_RATIO * exact_seconds:
        return
    unit = "features" if fast["route"] == "lowrank" else "terms"
    warnings.warn(
        f"method='fast': predicted {fs:.3g} s against the exact method's {exact_seconds:.3g} s"
        f" ({fs / max(exact_seconds, 1e-12):.3g}x slower): the {fast['route']} route needs degree"
        f" {fast['degree']} ({fast['terms']} {unit})"
        " and"
        f" {_native.format_bytes(fast['fast_working_set_bytes'])} for this eps; method='auto'"
        " runs the exact method here",
        UserWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside fastrope."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def _backward_probe(call, fast_probe, dout4=None, threads=None, dlse3=None, route="auto"):
    """``probe(kernel_eps, limit) -> dict``: the native fast backward's plan for ``call``.

    With ``dout4`` the certificate is for that ``dout``; without (``plan(..., backward=True)``),
    for any ``dout`` with entries at most 1.  Shape-tuple plans (``call.v_max_given``) take
    ``R`` from the forward probe, which reports the caller's ``bound_r``.
    """
    given = None
    if call.v_max_given is not None and fast_probe is not None:
        given = (float(fast_probe(1e300, 1 << 62)["bound_r"]), float(call.v_max_given))

    def probe(kernel_eps: float, limit: int) -> dict:
        return _native.fast_backward(
            call.q4,
            call.k4,
            call.v4,
            dout4,
            **call.native_args(),
            eps=kernel_eps,
            want_dw=call.values is not None,
            want_dbias=call.want_dbias,
            memory_limit=limit,
            run=False,
            num_threads=threads,
            bounds=given,
            dlse=dlse3,
            route=route,
            grad_error=call.grad_error,
        )[7]

    probe.backward = True
    return probe


def _plan_backward(call, eps, method, limit, exact, exact_plan, fast_probe) -> Plan:
    """The backward half of :func:`make_plan`: fast backward vs exact backward.

    ``fast_probe`` is the backward probe (``attention_grad`` builds one with the caller's
    ``dout``: ``probe.backward = True``), or a forward probe (``plan(..., backward=True)``), in
    which case the plan is for any ``dout`` with entries at most 1.  The native certificate
    covers every returned gradient (dq, dk, dv, dw, dbias), float32 output rounding included, so
    the whole ``eps`` goes to it.
    """
    batch, hq, hk, nq, nk, d, dv = call.shape
    if nq == 0 or nk == 0 or batch * hq == 0 or fast_probe is None:
        if method == "fast":
            raise ApproximationError("method='fast': an empty axis leaves nothing to approximate")
        return exact_plan("an empty axis: the exact method is immediate")
    probe = fast_probe if getattr(fast_probe, "backward", False) else None
    try:
        if probe is None:
            probe = _backward_probe(call, fast_probe, route=getattr(fast_probe, "route", "auto"))
        info = probe(eps, limit)
    except ApproximationError as e:
        if method == "fast":
            raise ApproximationError(f"method='fast': the fast backward: {e}") from None
        return exact_plan(f"the fast backward cannot serve this call: {e}")
    fast = _fast_fields(info)
    # A deferred plan certifies each head from its data before its FFTs run (refusing
    # otherwise): what a result guarantees is then eps.
    certified = min(float(info["certified_error"]), eps)
    fast["fast_certified_error"] = certified
    details = {
        k: info[k]
        for k in (
            "path",
            "poly_family",
            "rho",
            "rho_derivative",
            "fft_len",
            "groups",
            "support_size",
            "column_tile",
            "kernel_spectra",
            "certified",
            "approximation",
            "rounding",
            "band",
            "multiplicity",
            "deferred",
            "grad_error",
            "grad_scale",
        )
    }
    return _choose(method, eps, limit, certified, fast, details, exact, exact_plan, info)
