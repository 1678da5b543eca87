"""The README's layout section is the package tree (regenerate: python -m scgrn_assets_tests.readme_layout --write)."""

from scgrn_assets_tests.readme_layout import ROOT, readme_with_layout


def test_readme_layout_section_matches_the_package_tree():
    readme = (ROOT / "README.md").read_text()
    assert readme_with_layout(readme) == readme, (
        "README.md's Layout section is stale: run `python -m scgrn_assets_tests.readme_layout --write`")
