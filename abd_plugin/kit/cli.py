"""Command line: ``abd-plugin`` (also ``python -m abd_plugin``).

    abd-plugin demo  [--out out] [--trigger badnet_grid] [--iterations 400]
    abd-plugin bench --dataset mnist5k --method zskt,dfad --trigger badnet_grid,trojan_wm \\
                     --defense none,abd_paper,abd --seeds 0,1,2 --out runs/bench
    abd-plugin poison --trigger badnet_grid --out teacher.pt
    abd-plugin train --adversarial pgd --eps 0.2 --steps 10      # a robust teacher
    abd-plugin train --nasty --omega 0.05 --tau 4                # a Nasty Teacher
    abd-plugin distill --method zskt --trigger badnet_grid --defense abd
    abd-plugin audit --teacher t.pt --arch lenet5                # a kit architecture
    abd-plugin audit --teacher t.pt --arch mynets:make_net --input-shape 3,32,32 --num-classes 10
    abd-plugin audit --teacher t.pt --arch torchvision:resnet18 --input-shape 3,32,32 \\
                     --num-classes 10
    abd-plugin list
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from abd_plugin.validation import Int, Num, Spec


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------- argument validation
# Every bad argument ends as one line on stderr and exit code 2 (no traceback), found before any
# work starts. A new subcommand gets the same by building its parser with add_subcommand() and
# its flags with the type helpers below: registered() for names from the kit's registries,
# number()/number_list() for range-checked numbers (the same Spec objects ABDConfig uses),
# writable_dir()/writable_file()/existing_file() for paths, abd_config() for --abd JSON; checks
# across flags go in the subcommand's ``validate`` function (raise UsageError).


class UsageError(Exception):
    """A bad command line: printed as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) raised as :class:`UsageError`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _classifiers() -> list[str]:
    from .models import list_models

    return [m for m in list_models() if not m.startswith("generator")]


def _names(kind: str) -> list[str]:
    """The names the kit knows for ``kind`` (read from its registries at call time)."""
    if kind == "dataset":
        from .datasets import list_datasets

        return list_datasets()
    if kind == "trigger":
        from .triggers import list_triggers

        return list_triggers()
    if kind == "arch":
        return _classifiers()
    if kind == "method":
        from .loops import list_loops

        return list_loops()
    if kind == "defense":
        from .bench import DEFENSES

        return sorted(DEFENSES)
    raise KeyError(kind)


def registered(kind: str, *, extra: Sequence[str] = (), many: bool = False) -> Callable[[str], Any]:
    """argparse ``type``: a name (``many``: a comma-separated list of names) known to the kit's
    ``kind`` registry (dataset, trigger, arch, method, defense), or one of ``extra``."""

    def parse(text: str) -> Any:
        items = _csv(text) if many else [text.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"needs at least one {kind} name")
        known = _names(kind) + list(extra)
        bad = [t for t in items if t not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, bad))}; known: {', '.join(known)}")
        return ",".join(items) if many else items[0]

    parse.__name__ = kind  # argparse names the type in its messages
    return parse


def _checked_names(kind: str, check: Callable[[str], Any], *, many: bool) -> Callable[[str], Any]:
    """argparse ``type``: a name (``many``: a comma-separated list) that ``check`` accepts (it
    raises ``ValueError``/``TypeError`` with the reason)."""

    def parse(text: str) -> Any:
        items = _csv(text) if many else [text.strip()]
        if not items or not all(items):
            raise argparse.ArgumentTypeError(f"needs at least one {kind} name")
        for t in items:
            try:
                check(t)
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(str(exc).splitlines()[0]) from None
        return ",".join(items) if many else items[0]

    parse.__name__ = kind
    return parse


def defense_names(*, many: bool = False) -> Callable[[str], Any]:
    """argparse ``type``: defense presets and hook defenses with options, joined by ``+``
    (``default+iga:gamma=3``; :func:`abd_plugin.kit.bench.parse_defense`)."""
    from .bench import parse_defense

    return _checked_names("defense", parse_defense, many=many)


def method_names(*, many: bool = False) -> Callable[[str], Any]:
    """argparse ``type``: distillation loops with DistillConfig options
    (``clean:temperature=4``; :func:`abd_plugin.kit.bench.parse_method`)."""
    from .bench import parse_method

    return _checked_names("method", parse_method, many=many)


def teacher_kinds(*, many: bool = False) -> Callable[[str], Any]:
    """argparse ``type``: teacher kinds with options (``pgd:eps=0.1``;
    :func:`abd_plugin.kit.teachers.check_teacher_kind`)."""
    from .teachers import check_teacher_kind

    return _checked_names("teacher", check_teacher_kind, many=many)


def number(check: Spec, kind: type = int) -> Callable[[str], Any]:
    """argparse ``type``: an ``int``/``float`` that ``check`` accepts (abd_plugin.validation)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {check.describe()}, got {text!r}") from None
        if check.problem(value) is not None:
            raise argparse.ArgumentTypeError(f"must be {check.describe()}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def number_list(check: Spec, kind: type = int) -> Callable[[str], list[Any]]:
    """argparse ``type``: a non-empty comma-separated list of numbers that ``check`` accepts."""
    one = number(check, kind)

    def parse(text: str) -> list[Any]:
        items = _csv(text)
        if not items:
            raise argparse.ArgumentTypeError(f"needs a comma-separated list, got {text!r}")
        return [one(t) for t in items]

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def writable_dir(text: str) -> str:
    """argparse ``type``: a directory that exists and is writable, or can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    anc = _existing_ancestor(path)
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {text!r} ({anc} is not a writable "
                                         "directory)")
    return text


def writable_file(text: str) -> str:
    """argparse ``type``: a file path that can be written (its directory exists or can be
    created)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    writable_dir(str(path.parent))
    return text


def existing_file(text: str) -> str:
    """argparse ``type``: a readable file."""
    if not Path(text).is_file() or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"no readable file {text!r}")
    return text


def abd_config(text: str) -> Any:
    """argparse ``type``: ABDConfig fields as a JSON object, checked by ABDConfig itself."""
    from abd_plugin import ABDConfig

    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object of ABDConfig fields, got {type(fields).__name__}")
    kw = {k: tuple(v) if k == "sv_coef_bounds" and isinstance(v, list) else v
          for k, v in fields.items()}
    try:
        return ABDConfig().replace(**kw)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_subcommand(sub: Any, name: str, help: str, fn: Callable[[argparse.Namespace], int],
                   validate: Callable[[argparse.Namespace], None] | None = None
                   ) -> argparse.ArgumentParser:
    """A subcommand parser whose help shows every flag's default, with ``--dry-run``; ``fn``
    runs it, ``validate`` (optional) checks across flags before any work (raise
    :class:`UsageError`)."""
    q = sub.add_parser(name, help=help, description=help,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--dry-run", action="store_true",
                   help="check the arguments, print them as JSON and stop")
    q.set_defaults(fn=fn, validate=validate)
    return q


def _check_target(args: argparse.Namespace) -> None:
    from .datasets import dataset_info

    classes = dataset_info(args.dataset).num_classes
    if not 0 <= args.target < classes:
        raise UsageError(f"argument --target: must be a class of {args.dataset} "
                         f"(0..{classes - 1}), got {args.target}")


def _check_arch_fits(args: argparse.Namespace, *, student: bool = False) -> None:
    """The architecture (and, with ``student``, its student) runs on the dataset's images: one
    forward of a zero image, before any training."""
    from .bench import STUDENTS
    from .datasets import dataset_info
    from .poison import build_model

    info = dataset_info(args.dataset)
    archs = [args.arch] + ([STUDENTS.get(args.arch, args.arch)] if student else [])
    for arch in dict.fromkeys(archs):
        try:
            with torch.no_grad():
                build_model(arch, args.dataset).eval()(
                    torch.zeros(1, info.channels, info.size, info.size))
        except Exception as exc:
            who = "--arch" if arch == args.arch else f"the student of --arch {args.arch}"
            raise UsageError(
                f"{who} {arch} does not fit --dataset {args.dataset} ({info.channels}x"
                f"{info.size}x{info.size} images): {str(exc).splitlines()[0][:120]}") from None


def _check_cell(args: argparse.Namespace) -> None:
    """distill/bench: local data present, teacher and student fit the dataset, a nasty teacher
    only with the clean trigger ``none``, a pgd teacher not with ``cl``."""
    _check_local_data(args)
    _check_target(args)
    _check_arch_fits(args, student=True)
    kinds = [k.split(":")[0] for k in _csv(args.teacher)]
    triggers = [t for t in _csv(args.trigger) if t != "none"]
    if "nasty" in kinds and triggers:
        raise UsageError(f"argument --teacher: a nasty teacher has no trigger; use --trigger none "
                         f"(got {','.join(triggers)})")
    if "pgd" in kinds and "cl" in triggers:
        raise UsageError("argument --teacher: the label-consistent trigger 'cl' is not supported "
                         "with adversarial training (pgd)")


def _check_local_data(args: argparse.Namespace) -> None:
    from .datasets import DATA_ROOT_ENV

    if args.dataset in ("cifar10", "gtsrb") and not os.environ.get(DATA_ROOT_ENV):
        raise UsageError(f"argument --dataset: {args.dataset} needs a local copy (nothing is "
                         f"downloaded): set {DATA_ROOT_ENV}=<root>")


SEED = Int(0, 2**63 - 2)
ASR_TOOK = 80.0  #: a poisoned teacher whose test ASR (%) is below this did not learn the backdoor


class _Bar:
    """A tqdm progress bar when tqdm is installed, a quiet counter otherwise."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def __call__(self, step: int, total: int, msg: str) -> None:
        if self.bar is None:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, desc=self.desc, leave=False, mininterval=1.0, file=sys.stderr
                )
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(1)
            if step % 50 == 0:
                self.bar.set_postfix_str(msg)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def cmd_list(_: argparse.Namespace) -> int:
    from abd_plugin.integrations import list_adapters

    from .bench import DEFENSES, HOOK_DEFENSES
    from .datasets import list_datasets
    from .loops import list_loops
    from .models import list_models
    from .teachers import TEACHER_KINDS
    from .triggers import list_triggers

    for name, items in [
        ("datasets", list_datasets()),
        ("triggers", list_triggers()),
        ("models", list_models()),
        ("methods", list_loops()),
        ("defenses", sorted(DEFENSES)),
        ("hook defenses", sorted(HOOK_DEFENSES)),
        ("teacher kinds", list(TEACHER_KINDS)),
        ("adapters", list_adapters()),
    ]:
        print(f"{name}: {', '.join(items)}")
    return 0


def cmd_poison(args: argparse.Namespace) -> int:
    from .poison import TeacherSpec, train_teacher

    spec = TeacherSpec(
        dataset=args.dataset,
        arch=args.arch,
        trigger=None if args.trigger == "none" else args.trigger,
        target=args.target,
        poison_ratio=args.ratio,
        epochs=args.epochs,
        seed=args.seed,
    )
    model, meta = train_teacher(spec, progress=lambda m: print(m, file=sys.stderr))
    out = {k: v for k, v in meta.items() if k != "spec"}
    took = None
    if spec.trigger is not None:
        took = float(meta.get("asr", 0.0)) >= ASR_TOOK
        out["backdoor_took"] = took
        if not took:
            out["warning"] = (
                f"the backdoor did not take: ASR {meta.get('asr', 0.0):.1f} % < {ASR_TOOK:.0f} % "
                "on triggered test images; this is not a working poisoned teacher (try more "
                "--epochs or a larger --ratio)")
            print(f"WARNING: {out['warning']}", file=sys.stderr)
    print(json.dumps(out))
    if args.out:
        torch.save(model.state_dict(), args.out)
        note = " - NOT a working backdoor, see the warning" if took is False else ""
        print(f"saved state_dict to {args.out} (load it with abd_plugin.load_teacher){note}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or load from the cache) a teacher of another kind: adversarially robust (PGD) or
    nasty; without either flag, a plain teacher (``poison``'s)."""
    from .poison import TeacherSpec

    base = TeacherSpec(dataset=args.dataset, arch=args.arch,
                       trigger=None if args.trigger == "none" else args.trigger,
                       target=args.target, epochs=args.epochs, seed=args.seed)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.adversarial:
        from .robust import AdversarialSpec, train_robust_teacher

        model, meta = train_robust_teacher(AdversarialSpec(
            base=base, attack=args.adversarial, eps=args.eps, steps=args.steps,
            step_size=args.step_size, eps_warmup_epochs=args.eps_warmup), progress=log)
    elif args.nasty:
        from .nasty import NastySpec, train_nasty

        model, meta = train_nasty(NastySpec(base=base, omega=args.omega, tau=args.tau),
                                  progress=log)
    else:
        from .poison import train_teacher

        model, meta = train_teacher(base, progress=log)
    print(json.dumps({k: v for k, v in meta.items() if k != "spec"}))
    if args.out:
        torch.save(model.state_dict(), args.out)
        print(f"saved state_dict to {args.out} (load it with abd_plugin.load_teacher)")
    return 0


# ---------------------------------------------------------------------- a user's own model
# ``abd-plugin audit --arch`` takes a kit name, ``torchvision:NAME`` (built with weights=None and
# --num-classes, never downloaded) or ``module.path:callable`` (a factory of the user's, imported
# from the current directory or PYTHONPATH, called with no arguments). Every way this can fail
# (an import, a factory, a weights file that does not fit) is one line and exit code 2.

TORCHVISION = "torchvision:"


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def arch_spec(text: str) -> str:
    """argparse ``type`` of ``audit --arch``: a kit name, ``torchvision:NAME`` or
    ``module.path:callable`` (checked for form here; imported by :func:`build_user_model`)."""
    text = text.strip()
    if text in _classifiers():
        return text
    mod, sep, attr = text.partition(":")
    if sep and _dotted(mod) and _dotted(attr):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown arch {text!r}; known: {', '.join(_classifiers())}; or torchvision:NAME "
        "(a torchvision model, weights=None), or module.path:callable (a factory of your own)")


arch_spec.__name__ = "arch"


def is_user_arch(arch: str) -> bool:
    """``module.path:callable`` or ``torchvision:NAME`` (not a kit name)."""
    return ":" in arch


def input_shape(text: str) -> tuple[int, int, int]:
    """argparse ``type``: ``C,H,W``, three positive integers (one input, no batch dimension)."""
    parts = _csv(text)
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or len(parts) != 3 or not all(1 <= d <= 4096 for d in dims):
        raise argparse.ArgumentTypeError(
            f"must be C,H,W (three integers in 1..4096, e.g. 3,32,32), got {text!r}")
    return dims[0], dims[1], dims[2]


input_shape.__name__ = "shape"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _import_factory(arch: str) -> Callable[[], Any]:
    """The callable named by ``module.path:callable``, its module imported as ``python -m``
    would (the current directory first on ``sys.path``)."""
    import importlib

    mod_name, _, attr = arch.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            # the module itself (or its package), not something it imports
            raise UsageError(
                f"argument --arch: cannot import module {mod_name!r} ({_first_line(exc)}); it "
                f"must be importable from the current directory ({cwd}) or PYTHONPATH") from None
        raise UsageError(f"argument --arch: importing {mod_name!r} failed ({_first_line(exc)}); "
                         "install what it imports or fix the module") from None
    except Exception as exc:  # the module's own code raised
        raise UsageError(f"argument --arch: importing {mod_name!r} failed ({_first_line(exc)}); "
                         "fix the module") from None
    where = getattr(obj, "__file__", None) or mod_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"argument --arch: {where} has no attribute {attr!r}; name a "
                             "function or class defined in it that returns the nn.Module")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"argument --arch: {arch} is not callable (type "
                         f"{type(obj).__name__}); name a function or class that returns the "
                         "nn.Module")
    return obj


def build_user_model(arch: str, num_classes: int) -> torch.nn.Module:
    """The model of ``torchvision:NAME`` (``weights=None``, ``num_classes``) or of the factory
    ``module.path:callable`` (called with no arguments). Raises :class:`UsageError`."""
    if arch.startswith(TORCHVISION):
        name = arch[len(TORCHVISION):]
        try:
            import torchvision
        except ImportError:
            raise UsageError(f"argument --arch: {arch} needs torchvision (pip install "
                             "'abd-plugin[vision]')") from None
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"argument --arch: torchvision has no classification model "
                             f"{name!r}{hint}; see torchvision.models.list_models()")
        what = f"torchvision.models.get_model({name!r}, weights=None, num_classes={num_classes})"
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except Exception as exc:
            raise UsageError(f"argument --arch: {what} failed ({_first_line(exc)})") from None
    else:
        factory = _import_factory(arch)
        what = f"{arch}()"
        try:
            model = factory()
        except Exception as exc:
            raise UsageError(f"argument --arch: calling {what} failed ({_first_line(exc)}); the "
                             "factory is called with no arguments") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"argument --arch: {what} returned a {type(model).__name__}, not a "
                         "torch.nn.Module; make it return the model")
    return model


def _check_forward(model: torch.nn.Module, arch: str, shape: Sequence[int],
                   num_classes: int) -> None:
    """One forward of a zero input: the model takes ``shape`` and returns ``num_classes``
    logits."""
    from abd_plugin import extract_logits

    dims = "x".join(map(str, shape))
    try:
        with torch.no_grad():
            logits = extract_logits(model.eval()(torch.zeros(1, *shape)))
    except Exception as exc:
        raise UsageError(f"argument --input-shape: the model of --arch {arch} fails on an input "
                         f"of shape 1x{dims} ({_first_line(exc)}); give the shape it takes"
                         ) from None
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise UsageError(f"argument --arch: the model of {arch} returns shape "
                         f"{tuple(logits.shape)} for one input; expected (1, classes) logits")
    if logits.shape[1] != num_classes:
        raise UsageError(f"argument --num-classes: the model of --arch {arch} returns "
                         f"{logits.shape[1]} logits, not {num_classes}")


class _StateCapture(torch.nn.Module):
    """Receives the state dict that :func:`abd_plugin.load_teacher` read (safely) from a file."""

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[str, Any] = {}

    def load_state_dict(self, state_dict: Any, strict: bool = True,
                        assign: bool = False) -> Any:
        self.state = dict(state_dict)
        return None


def _shape(v: Any) -> str:
    return "x".join(map(str, getattr(v, "shape", ()))) or "scalar"


def _listed(keys: Sequence[str], n: int = 3) -> str:
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def weights_problem(state: dict[str, Any], model: torch.nn.Module) -> str | None:
    """What keeps ``state`` from loading into ``model`` (missing/unexpected keys, shape
    mismatches), in a few words, or None when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {_shape(state[k])}, model {_shape(own[k])}" for k in own
              if k in state and getattr(state[k], "shape", None) != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_listed(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({_listed(shapes, 2)})")
    return "; ".join(parts) or None


def _prefix_hint(state: dict[str, Any], model: torch.nn.Module) -> str:
    """A fix when the file's keys are the model's under a common prefix (``model.``)."""
    own, keys = list(model.state_dict()), list(state)
    if own and keys and len(own) == len(keys):
        for a, b, where in ((keys, own, "file"), (own, keys, "model")):
            head = a[0][: len(a[0]) - len(b[0])] if a[0].endswith(b[0]) else ""
            if head and all(x == head + y for x, y in zip(a, b, strict=True)):
                return (f"; every key of the {where} starts with {head!r}: save the inner "
                        "module's state_dict")
    return ""


def load_user_weights(path: str, model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Load the state_dict file ``path`` into ``model`` (eval mode). Raises :class:`UsageError`
    with one line when the file cannot be read or does not fit."""
    from abd_plugin import load_teacher

    capture = _StateCapture()
    try:
        load_teacher(path, capture)
    except Exception as exc:  # unsafe pickle, unreadable/foreign file, missing file
        raise UsageError(f"argument --teacher: {str(exc).strip().splitlines()[0]}") from None
    state = capture.state
    problem = weights_problem(state, model)
    if problem is not None:
        hint = _prefix_hint(state, model) or (
            "; pass the --arch (and --num-classes) the weights were saved from"
            if is_user_arch(arch) else
            "; pass the --arch (and --dataset) the weights were saved from, or your own "
            "architecture as --arch module.path:callable")
        raise UsageError(f"argument --teacher: {Path(path).name} does not fit --arch {arch}: "
                         f"{problem}{hint}")
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise UsageError(f"argument --teacher: {Path(path).name} does not load into --arch "
                         f"{arch} ({_first_line(exc)})") from None
    return model.eval()


def audit_field(name: str) -> tuple[Spec, str, Any]:
    """``(spec, first sentence of its meaning, default)`` of an :class:`AuditSettings` field:
    the audit's flags say what the section says."""
    import dataclasses

    from abd_plugin.audit import AuditSettings
    from abd_plugin.validation import field_specs

    check, doc = field_specs(AuditSettings)[name]
    default = next(f.default for f in dataclasses.fields(AuditSettings) if f.name == name)
    text = " ".join(doc.split()).replace("``", "")
    return check, text.split(". ")[0].rstrip("."), default


def _settings(args: argparse.Namespace) -> Any:
    """The audit section from the flags (its rule between fields raises a usage error)."""
    from abd_plugin.audit import AuditSettings

    try:
        return AuditSettings(starts=args.starts, steps=args.steps, alpha=args.alpha,
                             clean_alpha=args.clean_alpha)
    except ValueError as err:
        raise UsageError(f"arguments --alpha/--clean-alpha: {err}") from None


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit one teacher file without data: verdict, per-class table, bar plot."""
    from abd_plugin.audit import audit

    from .auditing import plot_audit

    torch.set_num_threads(1)  # a LeNet-sized audit gains nothing from threads
    model = getattr(args, "_model", None)
    if model is None:  # parse_args() checked the arguments without building the model
        _resolve_audit_model(args)
        model = args._model
    rep = audit(model, args._input_shape, input_range=args._input_range,
                num_classes=args._num_classes, settings=_settings(args), seed=args.seed)
    print(rep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(rep.as_dict(), indent=1))
    try:
        plot_audit(rep, out / "audit.png", title=f"{Path(args.teacher).name} ({args.arch}): "
                   f"{rep.verdict}, suspect class {rep.suspect}, p = {rep.p_value:.2g}")
        print(f"wrote {out / 'audit.png'} and {out / 'audit.json'}")
    except ImportError:
        print(f"wrote {out / 'audit.json'} (no plot: pip install 'abd-plugin[bench]')")
    return 0


def _resolve_audit_model(args: argparse.Namespace) -> None:
    """``audit``: build the architecture, check one forward, load the weights (every failure a
    :class:`UsageError`); keep the model, input shape, classes and input range on ``args``
    (``_``-names). Without --input-range: a kit arch's dataset's model-input range, else 0,1."""
    from .auditing import dataset_input_range
    from .datasets import dataset_info
    from .poison import build_model

    input_range = args.input_range
    if is_user_arch(args.arch):
        shape, classes = args.input_shape, args.num_classes
        model = build_user_model(args.arch, classes)
        if input_range is None:
            input_range = (0.0, 1.0)
    else:
        args.dataset = args.dataset or "mnist5k"
        info = dataset_info(args.dataset)
        shape, classes = (info.channels, info.size, info.size), info.num_classes
        model = build_model(args.arch, args.dataset)
        if input_range is None:
            input_range = dataset_input_range(args.dataset)
    _check_forward(model, args.arch, shape, classes)
    args._model = load_user_weights(args.teacher, model, args.arch)
    args._input_shape, args._num_classes = tuple(shape), classes
    args._input_range = tuple(input_range)


def cmd_audit_table(args: argparse.Namespace) -> int:
    """Audit every kit teacher of a grid (training the ones not cached): the audit's own table."""
    from .auditing import audit_table

    torch.set_num_threads(1)
    audit_table(_csv(args.arch), _csv(args.trigger), args.seeds, dataset=args.dataset,
                settings=_settings(args), audit_seed=args.seed, out=Path(args.out),
                log=lambda m: print(m, file=sys.stderr))
    print((Path(args.out) / "audit.md").read_text())
    return 0


def _range_pair(text: str) -> tuple[float, float]:
    """argparse ``type``: ``low,high`` (finite, low < high)."""
    parts = _csv(text)
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers low,high, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"needs finite low < high, got {text!r}")
    return lo, hi


_range_pair.__name__ = "range"


def cmd_distill(args: argparse.Namespace) -> int:
    from .bench import Cell, run_cell

    torch.set_num_threads(1)  # as the bench: the same cell gives the bench's row on a machine
    abd = args.abd  # an explicit configuration, e.g. '{"sr": false, "shuffle_layers": 1}'
    name = "custom" if abd is not None else args.defense
    cell = Cell(
        args.dataset, args.method, args.trigger, name, args.seed, args.arch, args.iterations,
        teacher=args.teacher, target=args.target, poison_ratio=args.poison_ratio,
    )
    bar = _Bar(f"{args.method}/{name}")
    row = run_cell(cell, progress=bar, abd=abd)
    bar.close()
    print(json.dumps({k: v for k, v in row.items() if k != "history"}, indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import grid, run_bench

    # LeNet-sized cells gain nothing from threads; one thread makes runs repeatable on a machine
    # and lets two benches share two cores (the bench resumes, so grids can run side by side)
    torch.set_num_threads(1)
    cells = grid(args.dataset, _csv(args.method), _csv(args.trigger), _csv(args.defense),
                 args.seeds, arch=args.arch, iterations=args.iterations,
                 clean_rows=not args.no_clean_rows, teachers=_csv(args.teacher),
                 target=args.target, poison_ratio=args.poison_ratio)
    rows = run_bench(
        cells,
        Path(args.out),
        progress_factory=lambda c: _Bar(f"{c.method}/{c.trigger}/{c.defense}/s{c.seed}"),
    )
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/results.csv, results.json, table.md, plot.png")
    return 0 if rows else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Poison a teacher on real MNIST, distill it data-free with and without ABD, print the
    ACC/ASR table and write a plot."""
    from .bench import Cell, run_cell

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(
        1
    )  # LeNet-sized work: no gain from threads, and the numbers match the bench cells
    t0 = time.perf_counter()
    defenses = _csv(args.defense)
    rows = {}
    for d in defenses:
        cell = Cell("mnist5k", "zskt", args.trigger, d, args.seed, "lenet5", args.iterations)
        print(f"distilling with defense={d} ...", file=sys.stderr)
        bar = _Bar(f"zskt/{d}")
        rows[d] = run_cell(cell, progress=bar, eval_every=max(1, args.iterations * 5 // 8))
        bar.close()
    clean = run_cell(
        Cell("mnist5k", "clean", args.trigger, "none", args.seed, "lenet5", args.iterations)
    )
    first = rows[defenses[0]]
    lines = [
        f"ABD demo: mnist5k (real MNIST digits), LeNet-5 teacher poisoned with {args.trigger} "
        "-> target 0,",
        f"data-free ZSKT into LeNet-5-half, {args.iterations} iterations x 5 student steps, "
        f"seed {args.seed}",
        "",
        f"{'model':<34}{'ACC %':>8}{'ASR %':>8}",
        f"{'teacher (poisoned)':<34}{first['teacher_acc']:>8.1f}{first['teacher_asr']:>8.1f}",
        f"{'clean KD on real data (reference)':<34}{clean['acc']:>8.1f}{clean['asr']:>8.1f}",
    ]
    names = {"none": "data-free KD, no defense",
             "default": "data-free KD + ABDGuard (default)",
             "abd": "data-free KD + ABDGuard (default)",
             "abd_paper": "data-free KD + ABD (paper recipe)",
             "abd_tuned": "data-free KD + ABD (SV/SR tuned)"}
    for d, r in rows.items():
        lines.append(f"{names.get(d, 'data-free KD + ' + d):<34}{r['acc']:>8.1f}{r['asr']:>8.1f}")
        if r.get("audit_verdict") not in (None, "off"):
            if r["erase_status"] != "on":
                on = "eraser off"
            elif r.get("erase_family") == "spectral":
                on = f"spectral gain for class {r['erase_target']}"
            else:
                on = f"erased {r['erase_pixels']} pixel(s) for class {r['erase_target']}"
            lines.append(f"{'':<4}audit: {r['audit_verdict']}, suspect class "
                         f"{r['audit_suspect']} (p = {r['audit_p_value']:.2g}, "
                         f"{r['audit_seconds']:.1f}s); {on}")
        if r.get("sv_status", "off") != "off" or r.get("sr_steps"):
            lines.append(f"{'':<4}SV {r['sv_status']}, shuffled {r['shuffled_layers']}, suspicious "
                         f"{r['suspicious_fraction']:.2f}; SR steps {r['sr_steps']}")
    lines.append(f"\n(total {time.perf_counter() - t0:.0f}s)")
    text = "\n".join(lines)
    print(text)
    (out / "demo.txt").write_text(text + "\n")
    (out / "demo.json").write_text(json.dumps({"clean_kd": clean, **rows}, indent=1))
    try:
        _demo_plot(rows, clean, out / "demo.png")
        print(f"wrote {out / 'demo.png'}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'abd-plugin[bench]')")
    return 0


def _demo_plot(rows: dict, clean: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["teacher", "clean KD"] + list(rows)
    first = next(iter(rows.values()))
    acc = [first["teacher_acc"], clean["acc"]] + [r["acc"] for r in rows.values()]
    asr = [first["teacher_asr"], clean["asr"]] + [r["asr"] for r in rows.values()]
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], acc, 0.4, label="ACC")
    axes[0].bar([i + 0.2 for i in x], asr, 0.4, label="ASR")
    axes[0].set_xticks(list(x))
    axes[0].set_xticklabels(names, fontsize=8)
    axes[0].set_ylim(0, 105)
    axes[0].set_ylabel("%")
    axes[0].legend()
    axes[0].set_title("final student")
    for d, r in rows.items():
        h = r.get("history") or []
        if h:
            axes[1].plot(
                [p["step"] for p in h], [p["asr"] for p in h], marker="o", label=f"ASR {d}"
            )
            axes[1].plot(
                [p["step"] for p in h], [p["acc"] for p in h], ls="--", marker=".", label=f"ACC {d}"
            )
    axes[1].set_xlabel("student steps")
    axes[1].set_ylim(0, 105)
    axes[1].legend(fontsize=7)
    axes[1].set_title("during distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="abd-plugin", description="ABD: defend data-free KD against backdoored teachers",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    iterations = number(Int(1))
    seed = number(SEED)

    d = add_subcommand(sub, "demo", "the README's main job (about 5 minutes on 2 CPU cores)",
                       cmd_demo)
    d.add_argument("--out", type=writable_dir, default="out",
                   help="directory for demo.txt, demo.json and demo.png")
    d.add_argument("--trigger", type=registered("trigger"), default="l0_inv",
                   help="backdoor trigger of the poisoned teacher (abd-plugin list)")
    d.add_argument("--defense", type=defense_names(many=True),
                   default="none,abd_paper,default", help="comma-separated defense presets")
    d.add_argument("--iterations", type=iterations, default=400,
                   help="distillation iterations (x 5 student steps)")
    d.add_argument("--seed", type=seed, default=0, help="seed of the distillation runs")

    def common(q: argparse.ArgumentParser, *, many: bool = False) -> None:
        q.add_argument("--dataset", type=registered("dataset"), default="mnist5k",
                       help="dataset of the teacher (abd-plugin list)")
        q.add_argument("--arch", type=registered("arch"), default="lenet5",
                       help="teacher architecture; the student is its standard pair")
        q.add_argument("--iterations", type=iterations, default=400,
                       help="distillation iterations (x 5 student steps)")
        q.add_argument("--teacher", type=teacher_kinds(many=many),
                       default="standard",
                       help="teacher kind: standard, pgd[:eps=..], nasty[:omega=..] "
                            "(abd_plugin.kit.teachers; bench: comma-separated)")
        q.add_argument("--target", type=number(Int(0)), default=0,
                       help="target class of the teachers' backdoor (below the number of "
                            "classes)")
        q.add_argument("--poison-ratio", type=number(Num(0, 1, lo_open=True, hi_open=True),
                                                     float), default=0.1,
                       help="fraction of the teachers' training set poisoned, in (0, 1) "
                            "(clean label triggers: at most all images of the target class)")

    b = add_subcommand(sub, "bench", "grid of methods x triggers x defenses x seeds (resumable)",
                       cmd_bench, _check_cell)
    common(b, many=True)
    b.add_argument("--method", type=method_names(many=True), default="zskt",
                   help="comma-separated distillation loops, each with optional DistillConfig "
                        "overrides (clean:temperature=4)")
    b.add_argument("--trigger", type=registered("trigger", extra=("none",), many=True),
                   default="badnet_grid", help="comma-separated triggers ('none': clean teacher)")
    b.add_argument("--defense", type=defense_names(many=True),
                   default="none,abd_paper,default",
                   help="comma-separated defenses: presets, hook defenses with options "
                        "(iga:gamma=3), or one preset and hooks joined by + (default+iga)")
    b.add_argument("--seeds", type=number_list(SEED), default="0",
                   help="comma-separated integer seeds")
    b.add_argument("--out", type=writable_dir, default="runs/bench",
                   help="results directory (cells.jsonl, results.csv/json, table.md, plot.png)")
    b.add_argument(
        "--no-clean-rows", action="store_true", help="skip clean-KD and clean-teacher rows"
    )

    def check_poison(args: argparse.Namespace) -> None:
        _check_local_data(args)
        _check_target(args)
        _check_arch_fits(args)

    po = add_subcommand(sub, "poison", "train (or load from cache) a poisoned teacher",
                        cmd_poison, check_poison)
    po.add_argument("--dataset", type=registered("dataset"), default="mnist5k",
                    help="training data (abd-plugin list)")
    po.add_argument("--arch", type=registered("arch"), default="lenet5",
                    help="teacher architecture")
    po.add_argument("--trigger", type=registered("trigger", extra=("none",)),
                    default="badnet_grid", help="backdoor trigger ('none': a clean teacher)")
    po.add_argument("--target", type=number(Int(0)), default=0,
                    help="target class of the backdoor (below the number of classes)")
    po.add_argument("--ratio", type=number(Num(0, 1, lo_open=True, hi_open=True), float),
                    default=0.1, help="fraction of the training set poisoned, in (0, 1)")
    po.add_argument("--epochs", type=number(Int(1)), default=15, help="training epochs")
    po.add_argument("--seed", type=seed, default=0, help="training seed")
    po.add_argument("--out", type=writable_file, default=None,
                    help="write the teacher's state_dict here (None: only the cache)")

    def check_train(args: argparse.Namespace) -> None:
        _check_local_data(args)
        _check_target(args)
        _check_arch_fits(args)
        if args.adversarial and args.nasty:
            raise UsageError("argument --nasty: not allowed with --adversarial (choose one)")
        if args.nasty and args.trigger != "none":
            raise UsageError("argument --trigger: a nasty teacher is trained on clean data "
                             "(use --trigger none)")
        if args.adversarial and args.trigger == "cl":
            raise UsageError("argument --trigger: the label-consistent trigger 'cl' is not "
                             "supported with adversarial training")

    tr = add_subcommand(sub, "train", "train (or load from cache) a robust (PGD) or nasty "
                        "teacher; without --adversarial/--nasty a plain one", cmd_train,
                        check_train)
    tr.add_argument("--dataset", type=registered("dataset"), default="mnist5k",
                    help="training data (abd-plugin list)")
    tr.add_argument("--arch", type=registered("arch"), default="lenet5",
                    help="teacher architecture")
    tr.add_argument("--trigger", type=registered("trigger", extra=("none",)), default="none",
                    help="poison the training set first (not with --nasty)")
    tr.add_argument("--target", type=number(Int(0)), default=0,
                    help="target class of the backdoor (below the number of classes)")
    tr.add_argument("--epochs", type=number(Int(1)), default=15, help="training epochs")
    tr.add_argument("--seed", type=seed, default=0, help="training seed")
    tr.add_argument("--adversarial", choices=["pgd"], default=None,
                    help="adversarial training (PGD, L_inf)")
    tr.add_argument("--eps", type=number(Num(0, 1, lo_open=True), float), default=0.2,
                    help="L_inf radius of --adversarial in [0, 1] pixel units, in (0, 1]")
    tr.add_argument("--steps", type=number(Int(1)), default=10,
                    help="PGD steps per training batch (--adversarial)")
    tr.add_argument("--step-size", type=number(Num(0, lo_open=True), float), default=None,
                    help="PGD step (--adversarial; None: 2.5 * eps / steps)")
    tr.add_argument("--eps-warmup", type=number(Int(0)), default=5,
                    help="epochs over which eps ramps up (--adversarial; 0: full eps at once)")
    tr.add_argument("--nasty", action="store_true",
                    help="a Nasty Teacher against a normally trained one")
    tr.add_argument("--omega", type=number(Num(0), float), default=0.05,
                    help="weight of the Nasty Teacher's KL term (--nasty), >= 0")
    tr.add_argument("--tau", type=number(Num(0, lo_open=True), float), default=4.0,
                    help="temperature of the Nasty Teacher's KL term (--nasty), > 0")
    tr.add_argument("--out", type=writable_file, default=None,
                    help="write the teacher's state_dict here (None: only the cache)")

    di = add_subcommand(sub, "distill", "one distillation cell", cmd_distill, _check_cell)
    common(di)
    di.add_argument("--method", type=method_names(), default="zskt",
                    help="distillation loop")
    di.add_argument("--trigger", type=registered("trigger", extra=("none",)),
                    default="badnet_grid", help="trigger of the teacher ('none': clean teacher)")
    di.add_argument("--defense", type=defense_names(), default="abd",
                    help="defense: a preset, a hook defense with options (iga:gamma=3), or a "
                         "preset and hooks joined by + (default+iga)")
    di.add_argument("--seed", type=seed, default=0, help="seed of the distillation")
    di.add_argument("--abd", type=abd_config, default=None,
                    help="ABDConfig fields as a JSON object (overrides --defense)")
    def audit_flags(q: argparse.ArgumentParser) -> None:
        # the audit section's own specs, defaults and meanings (abd_plugin.audit.AuditSettings)
        for name in ("starts", "steps", "alpha", "clean_alpha"):
            check, doc, default = audit_field(name)
            kind = float if isinstance(check, Num) else int
            q.add_argument("--" + name.replace("_", "-"), type=number(check, kind),
                           default=default, help=doc)
        q.add_argument("--seed", type=seed, default=0, help="seed of the random starts")

    def check_audit(args: argparse.Namespace) -> None:
        _settings(args)  # the section's rule between fields (clean_alpha >= alpha)
        if is_user_arch(args.arch):
            for flag, value in (("--input-shape", args.input_shape),
                                ("--num-classes", args.num_classes)):
                if value is None:
                    raise UsageError(f"argument {flag}: required with --arch {args.arch} (a "
                                     "model of your own), e.g. --input-shape 3,32,32 "
                                     "--num-classes 10")
            if args.dataset is not None:
                raise UsageError(f"argument --dataset: only for a kit --arch; --arch {args.arch} "
                                 "takes --input-shape and --num-classes")
        else:
            for flag, value in (("--input-shape", args.input_shape),
                                ("--num-classes", args.num_classes)):
                if value is not None:
                    raise UsageError(f"argument {flag}: only with --arch module.path:callable or "
                                     f"torchvision:NAME; the kit arch {args.arch} takes its "
                                     "input shape and classes from --dataset")
            args.dataset = args.dataset or "mnist5k"
            _check_arch_fits(args)
        _resolve_audit_model(args)  # imports the factory, checks a forward, loads the weights

    au = add_subcommand(sub, "audit", "data-free backdoor audit of one teacher file: verdict, "
                        "per-class table, bar plot", cmd_audit, check_audit)
    au.add_argument("--teacher", type=existing_file, required=True,
                    help="the teacher's weights (a state_dict file, e.g. from abd-plugin poison "
                    "--out; torch.save or safetensors)")
    au.add_argument("--arch", type=arch_spec, required=True,
                    help="the teacher's architecture: a kit model (abd-plugin list), "
                         "torchvision:NAME (a torchvision classifier built with weights=None and "
                         "--num-classes; nothing is downloaded), or module.path:callable (your "
                         "factory, called with no arguments, returning the nn.Module; the module "
                         "is imported from the current directory or PYTHONPATH)")
    au.add_argument("--input-shape", type=input_shape, default=None,
                    help="C,H,W of one input as the teacher receives it; required with "
                         "torchvision:NAME or module.path:callable")
    au.add_argument("--num-classes", type=number(Int(2, 1_000_000)), default=None,
                    help="number of classes (logits); required with torchvision:NAME or "
                         "module.path:callable")
    au.add_argument("--dataset", type=registered("dataset"), default=None,
                    help="what a kit --arch classifies (input shape and classes; None: "
                         "mnist5k); not with a model of your own")
    au.add_argument("--input-range", type=_range_pair, default=None,
                    help="low,high of valid inputs as the teacher receives them (default: a kit "
                         "--arch's dataset's: 0,1, or -2,2 for the normalised tinted32; 0,1 for "
                         "a model of your own)")
    audit_flags(au)
    au.add_argument("--out", type=writable_dir, default="out",
                    help="where audit.png and audit.json go")

    def check_audit_table(args: argparse.Namespace) -> None:
        _settings(args)

    at = add_subcommand(sub, "audit-table", "audit every kit teacher of a grid (trains the ones "
                        "not cached): target found, false alarms, seconds", cmd_audit_table,
                        check_audit_table)
    at.add_argument("--dataset", type=registered("dataset"), default="mnist5k",
                    help="training data of the teachers")
    at.add_argument("--arch", type=registered("arch", many=True), default="lenet5,lenet5_bn",
                    help="comma-separated teacher architectures")
    at.add_argument("--trigger", type=registered("trigger", extra=("none",), many=True),
                    default="none,badnet_grid,l0_inv,trojan_wm,square_in",
                    help="comma-separated triggers ('none': clean teachers)")
    at.add_argument("--seeds", type=number_list(SEED), default=[0, 1, 2],
                    help="comma-separated teacher training seeds")
    audit_flags(at)
    at.add_argument("--out", type=writable_dir, default="runs/audit",
                    help="where audit.md and audit.json go")

    add_subcommand(sub, "list", "datasets, triggers, models, methods, defenses, adapters",
                   cmd_list)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check ``argv`` (every flag, then the checks across flags); raises
    :class:`UsageError` for a bad command line. Nothing runs."""
    args = build_parser().parse_args(argv)
    if args.validate is not None:
        try:
            args.validate(args)
        except UsageError as err:
            raise UsageError(f"abd-plugin {args.cmd}: {err}") from None
    return args


def _jsonable(v: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)
                if f.name != "logits_fn"}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def main(argv: Sequence[str] | None = None) -> int:
    """The ``abd-plugin`` command. Returns the exit code: 0, or 2 for a bad command line (one
    line on stderr)."""
    try:
        args = parse_args(argv)
        if args.dry_run:
            print(json.dumps({k: _jsonable(v) for k, v in vars(args).items()
                              if k not in ("fn", "validate", "dry_run")
                              and not k.startswith("_")}))
            return 0
        return int(args.fn(args) or 0)
    except UsageError as err:
        msg = str(err)
        print(msg if msg.startswith("abd-plugin") else f"abd-plugin: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
