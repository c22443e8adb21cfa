"""Write README.md from nbs/index.ipynb without Quarto.

`nbdev-readme` renders the README with Quarto; where Quarto cannot be installed (CI, these machines) this
renders the same notebook with nbconvert's Markdown exporter. `--check` fails if README.md is out of date.
"""
import sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parents[1]


def render() -> str:
    nb = nbformat.read(root / 'nbs' / 'index.ipynb', as_version=4)
    body, _ = MarkdownExporter(exclude_output=True).from_notebook_node(nb)
    note = '<!-- generated from nbs/index.ipynb by tools/make_readme.py (or nbdev-readme); do not edit -->\n\n'
    return note + body.strip() + '\n'


if __name__ == '__main__':
    text, readme = render(), root / 'README.md'
    if '--check' in sys.argv:
        if readme.read_text() != text: sys.exit('README.md is out of date: run python tools/make_readme.py')
    else: readme.write_text(text)
