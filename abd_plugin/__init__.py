"""abd-plugin: Anti-Backdoor data-free knowledge distillation (ABD) as plug-in hooks.

The core (this package's top-level modules) imports only ``torch`` and ``numpy``:

* :class:`ABDGuard` wraps an existing data-free KD loop (``with ABDGuard(teacher, student):``).
* :class:`ShufflingVaccine` (SV) and :class:`SelfRetrospection` (SR) are the two defenses; both
  implement :class:`DefenseHook`, so a user can plug a defense of their own into the guard; a
  hook sees the guard through a :class:`GuardContext`.
* :class:`InputGradientAlignment` (KDIGA, hook) and :func:`iga_loss` (explicit) carry a robust
  teacher's adversarial robustness into the student by aligning input gradients.
* :class:`ABDConfig` is the frozen configuration, made of one settings section per defense
  (:class:`AuditSettings`, :class:`EraseSettings`, :class:`VaccineSettings`,
  :class:`RetrospectionSettings`, :class:`AlignmentSettings`); :func:`load_teacher` loads
  untrusted weights safely.
* The guard's report (:class:`GuardReport`) is one record per hook (:class:`HookReport`).

The evaluation kit (``abd_plugin.kit``) and the host adapters (``abd_plugin.integrations``) build
on this API; the core never imports them.
"""
from .audit import AuditSettings
from .checkpoint import CheckpointReadError, UnsafeCheckpointError, load_teacher
from .config import ABDConfig
from .domain import InputDomain
from .eraser import EraseSettings
from .gradient_alignment import AlignmentSettings, InputGradientAlignment, iga_loss
from .guard import ABDGuard, GuardReport
from .hooks import ABDWarning, DefenseHook, GuardContext, HookReport
from .hypergrad import fixed_point_hypergradient
from .outputs import extract_logits
from .retrospection import RetrospectionSettings, SelfRetrospection
from .schedule import SRSchedule
from .vaccine import ShufflingVaccine, VaccineSettings

__version__ = "0.1.0"

__all__ = [
    "ABDConfig",
    "AuditSettings",
    "EraseSettings",
    "VaccineSettings",
    "RetrospectionSettings",
    "AlignmentSettings",
    "ABDGuard",
    "GuardReport",
    "HookReport",
    "DefenseHook",
    "GuardContext",
    "InputDomain",
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
