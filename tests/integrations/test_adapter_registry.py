import importlib
import subprocess
import sys

import abd_plugin.integrations as integrations


def test_list_adapters_names_every_module():
    names = integrations.list_adapters()
    assert names == ["datafree", "deepinversion", "dfad", "lightning", "torchdistill", "zskt"]
    assert integrations.list_adapters("d*") == ["datafree", "deepinversion", "dfad"]
    for name in names:
        mod = importlib.import_module(f"abd_plugin.integrations.{name}")
        assert callable(mod.patch)
        assert any(tag in mod.SUPPORTED for tag in ("@", "==", ">="))  # names a commit or pin


def test_package_import_is_light():
    code = (
        "import sys, abd_plugin.integrations as i; i.list_adapters(); "
        "heavy = [m for m in ('torchvision', 'lightning', 'torchdistill', 'datafree', 'solver') "
        "if m in sys.modules]; print(heavy); assert not heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_not_a_top_level_package():
    import abd_plugin.integrations.datafree as d
    assert d.__name__ == "abd_plugin.integrations.datafree"
