"""The package's import-time behaviour: the CUDA allocator default (expandable segments) that a user's own setting
overrides."""
import os
import subprocess
import sys

READ = "import os, fasttune; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"


def _imported_with(value):
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if value is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = value
    return subprocess.run([sys.executable, "-c", READ], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_expandable_segments_by_default_and_the_users_setting_wins():
    assert _imported_with(None) == "expandable_segments:True"
    assert _imported_with("max_split_size_mb:128") == "max_split_size_mb:128"
    assert _imported_with("") == ""
