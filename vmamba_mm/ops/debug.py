"""Opt-in checks of tensor values in the ops, switched on by ``VMAMBA_MM_DEBUG_CHECKS=1``.

The ops check shapes, dtypes and devices on every call: those are host values and cost nothing.
A check of tensor values (today: A <= 0 in ``selective_scan``) has to bring a result from the
device to the host before Python can branch on it. On a GPU that is a host-device
synchronisation: the host waits until the GPU has drained its queue, once per SS2D of every step.
So value checks are off by default, on every device alike: a CPU run then behaves as a GPU run
does, and the models never need them (SS2D builds A = -exp(A_logs), <= 0 by construction).

Set ``VMAMBA_MM_DEBUG_CHECKS=1`` (or true/yes/on) to run them on every device, e.g. while
debugging a model that builds its own A; ``0``/false/no/off or unset leaves them off. The variable
is read at every call, so it can be switched inside a running process.
"""

import os

ENV_VAR = "VMAMBA_MM_DEBUG_CHECKS"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def value_checks_enabled() -> bool:
    """Whether the ops should check tensor values (``VMAMBA_MM_DEBUG_CHECKS``).

    Returns:
        True when the variable is 1/true/yes/on, False when it is unset or 0/false/no/off.

    Raises:
        ValueError: for any other value, so that a typo does not silently leave checks off.
    """
    value = os.environ.get(ENV_VAR, "")
    normalized = value.strip().lower()
    if normalized in _ON:
        return True
    if normalized in _OFF:
        return False
    raise ValueError(
        f"{ENV_VAR}={value!r} is not understood; set it to 1 to check tensor values in the ops "
        "(a host-device sync per call on a GPU) or to 0 / leave it unset to skip those checks."
    )
