"""Every python snippet of README.md, docs/integrations.md, docs/attention.md and docs/paged.md runs as shown (CPU-only here: the snippets
choose their device at run time), each in a fresh namespace; a snippet whose libraries are missing is
skipped with the reason."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/integrations.md", "docs/attention.md", "docs/paged.md"]


def snippets():
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            out.append(pytest.param(doc, block, id=f"{doc}#{i}"))
    return out


@pytest.mark.parametrize("doc,code", snippets())
def test_doc_snippet_runs(doc, code, monkeypatch, tmp_path):
    for lib in ("transformers", "peft", "bitsandbytes", "trl", "datasets", "tokenizers"):
        if re.search(rf"\b(import|from) {lib}\b|, {lib}\b", code) and importlib.util.find_spec(lib) is None:
            pytest.skip(f"{doc}: the snippet needs {lib}, which is not installed")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{doc} snippet", "exec"), {"__name__": "__doc_snippet__"})
