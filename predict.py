#!/usr/bin/env python
"""The one inference entrypoint: reads the task from the checkpoint and offers that task's verbs.

    python predict.py --ckpt checkpoints/demansia2/<run>/last.ckpt --help        # the verbs of that task
    python predict.py --ckpt last.ckpt classify img1.jpg img2.jpg --json
    python predict.py --ckpt face.ckpt compare a.jpg b.jpg
    python predict.py --ckpt agegender.ckpt export --out model.onnx
    python predict.py --ckpt last.ckpt export --format safetensors     # any task: weights + config, no pickle
    python predict.py --ckpt last.safetensors classify img1.jpg         # exports open like checkpoints
    python predict.py --ckpt release:hand identify hand.jpg             # a published model (demansia2, hand, palm),
    python predict.py --ckpt model-88.pt generate ...                   # or an upstream release file as it is
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from zoo.errors import ZooError, unknown, user_message  # noqa: E402

# Release formats predict.py opens directly (each module's `from_release(raw, path)` returns a zoo checkpoint dict,
# or None when the file is not its format).
RELEASE_READERS = ("models.demansia2.convert", "models.hand.convert", "models.palm.convert")


RELEASE_PREFIX = "release:"


def release_path(spec: str) -> str:
    """`release:<task>` (demansia2, hand, palm) -> the published file in the weights cache (zoo.pretrained), fetched
    on first use; offline without it, a ZooError naming the URL, the file and the folder."""
    import importlib

    from zoo.pretrained import released_file

    task = spec[len(RELEASE_PREFIX):]
    if f"models.{task}.convert" not in RELEASE_READERS:
        raise ZooError(f"--ckpt {spec}: published trained models exist for "
                       f"{', '.join(RELEASE_PREFIX + n.split('.')[1] for n in RELEASE_READERS)}.")
    module = importlib.import_module(f"models.{task}.convert")
    cfg = module.RELEASE if hasattr(module, "RELEASE") else module._release()
    return str(released_file(f"{task} release", cfg))


def open_model(path: str, device: str = "cpu", trust: bool = False):
    """A zoo checkpoint or .safetensors export, or an upstream release file (DeMansia 2's Tiny EMA .ckpt, the hand
    project's best.pth, a denoising-diffusion-pytorch model-N.pt), read as data and opened as its task's model;
    `release:<task>` names the task's published file (downloaded once into the weights cache)."""
    import importlib

    from zoo.checkpoint import model_from_checkpoint, read_checkpoint

    if path.startswith(RELEASE_PREFIX):
        path = release_path(path)

    ckpt = read_checkpoint(path, trust=trust, for_predict=True, any_dict=True)
    if not (ckpt.get("hyper_parameters") or {}).get("task"):
        for name in RELEASE_READERS:
            converted = importlib.import_module(name).from_release(ckpt, path)
            if converted is not None:
                print(f"[predict] {path}: opened as {name.split('.')[1]}'s released format", file=sys.stderr)
                ckpt = converted
                break
        else:
            raise ZooError(f"{path} is neither a checkpoint of this zoo nor a release format it knows (DeMansia 2's "
                           f"Tiny EMA .ckpt, the hand project's best.pth, a denoising-diffusion-pytorch model-N.pt); "
                           f"it holds {sorted(map(str, ckpt))[:10]}. See checkpoints/README.md.")
    return model_from_checkpoint(ckpt, path).to(device)


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt")
    pre.add_argument("--device", default="cpu")
    pre.add_argument("--trust-checkpoint", action="store_true")
    pre.add_argument("--compile", action="store_true")
    pre.add_argument("--compile-backend", default=None)
    pre.add_argument("verb", nargs="?")
    known, _ = pre.parse_known_args(argv)
    if not known.ckpt:
        if any(a in ("-h", "--help") for a in argv) or not argv:
            print(__doc__)
            return 0
        raise ZooError("predict.py needs --ckpt PATH (a checkpoint written by train.py; the task is read from it).")

    if known.compile or known.compile_backend:
        from callbacks.compile import check_backend

        check_backend(known.compile_backend or "inductor", "--compile-backend")
    import model_config  # noqa: F401 - the tasks' registrations, which load_model looks the checkpoint's task up in

    model = open_model(known.ckpt, known.device, known.trust_checkpoint)
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
    parser.add_argument("--compile", action="store_true", help="torch.compile the network; prints how long its "
                        "first call took against later ones (default: eager)")
    parser.add_argument("--compile-backend", default=None, metavar="BACKEND", help="torch.compile backend (implies "
                        "--compile; default inductor; aot_eager or eager only capture the graph)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for c in model.commands():
        c.add_arguments(sub.add_parser(c.name, aliases=list(c.aliases), help=c.help, description=c.help))
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    if args.verb not in commands:
        raise unknown("command", args.verb, commands)
    if not (args.compile or args.compile_backend):
        return commands[args.verb](model, args)
    from callbacks.compile import compile_network

    backend = args.compile_backend or "inductor"
    times = compile_network(model, backend)
    try:
        return commands[args.verb](model, args)
    finally:
        print(f"[predict] torch.compile ({backend}) of the network: "
              f"{times.summary('call') or 'the command did not call it'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except ZooError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
