"""gadiag: gradient-alignment diagnostics for on-policy distillation."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("gadiag")
