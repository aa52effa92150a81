"""abd-plugin: Anti-Backdoor data-free knowledge distillation (ABD) as plug-in hooks.

The core (this package's top-level modules) imports only ``torch`` and ``numpy``:

* :class:`ABDGuard` wraps an existing data-free KD loop (``with ABDGuard(teacher, student):``).
* :class:`ShufflingVaccine` (SV) and :class:`SelfRetrospection` (SR) are the two defenses; both
  implement :class:`DefenseHook`, so a user can plug a defense of their own into the guard; a
  hook sees the guard through a :class:`GuardContext`.
* :class:`InputGradientAlignment` (KDIGA, hook) and :func:`iga_loss` (explicit) carry a robust
  teacher's adversarial robustness into the student by aligning input gradients.
* :class:`ABDConfig` is the frozen configuration; :func:`load_teacher` loads untrusted weights
  safely.

The evaluation kit (``abd_plugin.kit``) and the host adapters (``abd_plugin.integrations``) build
on this API; the core never imports them.
"""
from .checkpoint import CheckpointReadError, UnsafeCheckpointError, load_teacher
from .config import ABDConfig
from .gradient_alignment import InputGradientAlignment, iga_loss
from .guard import ABDGuard, GuardReport
from .hooks import ABDWarning, DefenseHook, GuardContext
from .hypergrad import fixed_point_hypergradient
from .outputs import extract_logits
from .retrospection import SelfRetrospection
from .schedule import SRSchedule
from .vaccine import ShufflingVaccine

__version__ = "0.1.0"

__all__ = [
    "ABDConfig",
    "ABDGuard",
    "GuardReport",
    "DefenseHook",
    "GuardContext",
    "ShufflingVaccine",
    "SelfRetrospection",
    "SRSchedule",
    "InputGradientAlignment",
    "iga_loss",
    "fixed_point_hypergradient",
    "extract_logits",
    "load_teacher",
    "UnsafeCheckpointError",
    "CheckpointReadError",
    "ABDWarning",
    "__version__",
]
