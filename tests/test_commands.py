"""predict.py runs every verb under torch.inference_mode(), except verbs that trace or export."""
from __future__ import annotations

import argparse

import torch

from model_config import REGISTRY
from zoo.commands import Command


def test_verbs_run_under_inference_mode_unless_they_export():
    seen = {}

    def record(name):
        def run(model, args):
            seen[name] = torch.is_inference_mode_enabled()
            return 0
        return run

    args = argparse.Namespace()
    assert Command("a", "", lambda p: None, record("a"))(None, args) == 0
    assert Command("b", "", lambda p: None, record("b"), inference=False)(None, args) == 0
    assert seen == {"a": True, "b": False}


def test_every_export_verb_of_every_task_opts_out_of_inference_mode():
    for name, entry in REGISTRY.items():
        if entry.status != "ready":
            continue
        cls = entry.load("module")
        with torch.device("meta"):
            model = cls(config=entry.config.from_presets(entry.config.DEFAULT_PRESET))
        for command in model.commands():
            assert command.inference == (command.name != "export"), (name, command.name)
