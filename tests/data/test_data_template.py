from pathlib import Path

from stackllama_ds.data.template import format_prompt, format_qa


def test_template_is_the_stackllama_one():
    assert format_prompt("Why?") == "Question: Why?\n\nAnswer: "
    assert format_qa("Why?", "Because.") == "Question: Why?\n\nAnswer: Because."
    assert format_qa("q", "a").startswith(format_prompt("q"))


def test_data_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, stackllama_ds.data; print(any(m in sys.modules for m in ('datasets', 'lxml', 'torch')))"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert out.stdout.strip() == "False", out.stderr
