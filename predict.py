#!/usr/bin/env python
"""The one inference entrypoint: reads the task from the checkpoint and offers that task's verbs.

    python predict.py --ckpt checkpoints/demansia2/<run>/last.ckpt --help        # the verbs of that task
    python predict.py --ckpt last.ckpt classify img1.jpg img2.jpg --json
    python predict.py --ckpt face.ckpt compare a.jpg b.jpg
    python predict.py --ckpt agegender.ckpt export --out model.onnx
    python predict.py --ckpt last.ckpt export --format safetensors     # any task: weights + config, no pickle
    python predict.py --ckpt last.safetensors classify img1.jpg         # exports open like checkpoints
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from zoo.errors import ZooError, unknown, user_message  # noqa: E402


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt")
    pre.add_argument("--device", default="cpu")
    pre.add_argument("--trust-checkpoint", action="store_true")
    pre.add_argument("verb", nargs="?")
    known, _ = pre.parse_known_args(argv)
    if not known.ckpt:
        if any(a in ("-h", "--help") for a in argv) or not argv:
            print(__doc__)
            return 0
        raise ZooError("predict.py needs --ckpt PATH (a checkpoint written by train.py; the task is read from it).")

    import model_config  # noqa: F401 - the tasks' registrations, which load_model looks the checkpoint's task up in
    from zoo.checkpoint import load_model

    model = load_model(known.ckpt, map_location=known.device, trust=known.trust_checkpoint, for_predict=True)
    commands = {}
    for c in model.commands():
        commands.update({name: c for name in (c.name, *c.aliases)})
    if known.verb and not known.verb.startswith("-") and known.verb not in commands:
        offered = ", ".join(c.name + (f" (alias {', '.join(c.aliases)})" if c.aliases else "")
                            for c in model.commands())
        raise ZooError(f"'{known.verb}' is not a command of the '{model.TASK}' task, which {known.ckpt} holds. Its "
                       f"commands: {offered}. See `python predict.py --ckpt {known.ckpt} --help`.")
    parser = argparse.ArgumentParser(prog="predict.py", description=f"Commands of the '{model.TASK}' task.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-checkpoint", action="store_true", help="load --ckpt with full pickle, which can run "
                        "code: only for a file you trust that holds types beyond tensors and plain data")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for c in model.commands():
        c.add_arguments(sub.add_parser(c.name, aliases=list(c.aliases), help=c.help, description=c.help))
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    if args.verb not in commands:
        raise unknown("command", args.verb, commands)
    return commands[args.verb](model, args)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except ZooError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
