"""Each stage package's __init__ is current (regenerate: python -m scgrn_assets_tests.stage_packages --write),
and every public name it re-exports resolves."""

import importlib

import pytest

from scgrn_assets_tests.stage_packages import ROOT, SUMMARY, init_text


@pytest.mark.parametrize("package", sorted(SUMMARY))
def test_stage_package_init_is_generated_from_its_modules(package):
    assert (ROOT / package / "__init__.py").read_text() == init_text(package), (
        f"scgrn_assets/lib/{package}/__init__.py is stale: run `python -m scgrn_assets_tests.stage_packages --write`")


@pytest.mark.parametrize("package", sorted(SUMMARY))
def test_every_public_name_of_a_stage_package_resolves(package):
    module = importlib.import_module(f"scgrn_assets.lib.{package}")
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name")


def test_every_lib_folder_is_a_stage_package():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == set(SUMMARY)
