"""Evaluation kit for abd-plugin: triggers, datasets, model zoo and metrics.

The kit is *not* part of the core: ``abd_plugin`` never imports it. Import the
sub-modules you need directly, e.g. ``from abd_plugin.kit.triggers import get_trigger``.
This file deliberately imports nothing, so ``import abd_plugin.kit`` stays cheap
(torchvision, mlxtend and scikit-learn are imported lazily inside functions).
"""
