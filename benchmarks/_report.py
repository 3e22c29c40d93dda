"""Appends a measured section to BENCHMARKS.md with the platform, device and versions."""

from __future__ import annotations

import datetime
import os
import platform

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def environment_line() -> str:
  """One line naming the machine, device and library versions."""
  import flax
  devices = jax.devices()
  kind = devices[0].device_kind
  return (f"platform: {jax.default_backend()} ({len(devices)} x {kind}); host: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
          f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}; "
          f"date: {datetime.date.today().isoformat()}")


def append_section(title: str, body_markdown: str, path: str = BENCHMARKS_MD) -> None:
  """Appends `## title` + the environment line + `body_markdown` to BENCHMARKS.md."""
  new_file = not os.path.exists(path)
  with open(path, "a") as f:
    if new_file:
      f.write("# effx benchmarks\n\nEvery section is appended by a script in `benchmarks/` and "
              "names the platform it ran on. On the shared 2-core CPU only ratios measured in "
              "one run are meaningful.\n")
    f.write(f"\n## {title}\n\n_{environment_line()}_\n\n{body_markdown.rstrip()}\n")
