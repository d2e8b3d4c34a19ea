"""The docs: every link resolves, and the measurements they quote are those of the committed results files."""

import json
import os
import re

import pytest

from cnnjax.lab.bench import gpu_check, pipeline
from helpers import REPO_ROOT

DOCS = os.path.join(REPO_ROOT, "docs")
RESULTS = os.path.join(DOCS, "results")
# A Markdown link's target, skipping web addresses.
LINK = re.compile(r"\]\((?!https?:)([^)#\s]+)(?:#[^)]*)?\)")
BN_STUDY_BLOCK = re.compile(r"<!-- bn_study summary:[^\n]*-->\n(.*?)<!-- end of the bn_study summary -->", re.S)


def markdown_files():
  return [os.path.join(REPO_ROOT, "README.md")] + sorted(
      os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def read(path):
  with open(path) as f:
    return f.read()


@pytest.mark.parametrize("path", markdown_files(), ids=os.path.basename)
def test_every_relative_link_resolves(path):
  missing = [target for target in LINK.findall(read(path))
             if not os.path.exists(os.path.join(os.path.dirname(path), target))]
  assert not missing, f"{os.path.relpath(path, REPO_ROOT)} links to missing files: {missing}"


def test_the_bn_study_summary_is_the_studys_own():
  block = BN_STUDY_BLOCK.search(read(os.path.join(DOCS, "bn_study.md")))
  assert block, "docs/bn_study.md lost its generated summary block"
  assert block.group(1).strip() == read(os.path.join(RESULTS, "bn_study", "summary.md")).strip()


def test_the_pipeline_table_and_its_derived_numbers_are_the_results_files():
  with open(os.path.join(RESULTS, "pipeline_workers.json")) as f:
    payload = json.load(f)
  text = read(os.path.join(DOCS, "performance.md"))
  assert pipeline.markdown_table(dict(sorted(payload["settings"].items()))) in text
  derived = payload["derived"]
  assert f"about {derived['images_per_second_per_core']:.0f} ImageNet images per" in text
  assert f"needs about {derived['cores_for_target']:.0f} host cores" in text


def test_the_gpu_numbers_are_the_gpu_checks():
  with open(os.path.join(RESULTS, "gpu_check_h100.json")) as f:
    check = json.load(f)
  with open(os.path.join(RESULTS, "gpu_check_h100_first.json")) as f:
    first = {entry["model"]: entry for entry in json.load(f)["throughput"]}
  performance = read(os.path.join(DOCS, "performance.md"))
  assert gpu_check.markdown_table(check) in performance
  assert check["tests"]["gpu"]["status"] == "ok" and f"All {check['tests']['gpu']['passed']} GPU tests" in performance
  cost = f"{check['throughput'][0]['deterministic_over_fastest_step_time']:.2f}x"
  assert f"they cost {cost} in step time" in performance
  assert f"trains {cost} faster on one H100" in read(os.path.join(DOCS, "running.md"))
  flat = " ".join(performance.split())
  for model in ("resnet50", "resnet20"):
    assert f"{first[model]['torch_compiled']['images_per_second']:,.0f} img/s" in flat
    assert f"{first[model]['torch_eager']['images_per_second']:,.0f}" in flat


def test_results_files_record_their_command_commit_and_machine():
  for name in os.listdir(RESULTS):
    if name.endswith(".json"):
      with open(os.path.join(RESULTS, name)) as f:
        payload = json.load(f)
      assert {"command", "commit", "machine"} <= set(payload), name
