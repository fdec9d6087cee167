"""Ray is an optional extra: `import rollserve` (and building an LLM) never imports it."""

import subprocess
import sys

from helpers import REPO, cli_env


def test_import_rollserve_does_not_import_ray():
    code = "import sys, rollserve; rollserve.LLM; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), check=True, timeout=120)
