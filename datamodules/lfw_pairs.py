"""The LFW verification protocol's files: reading `pairs.txt` (scored by `zoo.verification.kfold_verification`).

`pairs.txt` (LFW View 2) starts with a header `N F` (N folds, F pairs of each kind per fold; LFW: `10 300`), then per
fold F same-person lines `name i j` and F different-person lines `name1 i name2 j`. Image i of a person is
`<images_root>/<name>/<name>_{i:04d}.jpg`. A one-number header `F` (`pairsDevTrain.txt`, `pairsDevTest.txt`, View 1)
is one fold: its threshold comes from `pairsDevTrain.txt` beside it (fold `CALIBRATION_FOLD`, never scored), or else
from cross-validation inside the file; never from the pairs it scores. Pairs naming an image that is not there (a
subset, a partial download) are skipped and counted (`PairSet.note`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zoo.errors import ZooError
from zoo.images import IMAGE_EXTENSIONS
from zoo.verification import (
    CALIBRATION_FOLD,  # Pair.fold of pairs used only to choose a one-fold file's threshold
)

DEV_TRAIN = "pairsDevTrain.txt"


@dataclass(frozen=True)
class Pair:
    """One line of pairs.txt: two image paths, whether they show the same person, and where the line was."""

    a: Path
    b: Path
    same: bool
    fold: int  # 0-based; CALIBRATION_FOLD for threshold-only pairs
    line_no: int  # 1-based, the header is line 1
    text: str


def lfw_image(root: Path, name: str, index: int) -> Path:
    """`<root>/<name>/<name>_{index:04d}.jpg`, or the same stem with another image extension (any case) if that exists."""
    path = root / name / f"{name}_{index:04d}.jpg"
    if path.is_file():
        return path
    folder = root / name
    if folder.is_dir():
        stem = path.stem.lower()
        for p in folder.iterdir():
            if p.stem.lower() == stem and p.suffix.lower() in IMAGE_EXTENSIONS:
                return p
    return path


def pairs_header(pairs_file: Path) -> tuple[int, int, list[str]]:
    """(folds, pairs of each kind per fold, all lines) of a pairs file; a one-number header is one fold."""
    lines = pairs_file.read_text().splitlines()
    if not lines or not lines[0].split():
        raise ZooError(f"{pairs_file} is empty; expected a header 'N F' (e.g. '10 300') and then the pairs.")
    head = lines[0].split()
    try:
        n_folds, per_fold = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    except ValueError:
        raise ZooError(f"{pairs_file} line 1 '{lines[0]}': expected the header 'N F' (N folds, F pairs of each kind "
                       f"per fold), e.g. '10 300'.") from None
    return n_folds, per_fold, lines


def read_pairs(pairs_file: str | Path, images_root: str | Path) -> list[Pair]:
    """Every pair of a pairs file, in file order, whether or not its images exist. Errors name the line (number and
    text) and say what was expected."""
    pairs_file, images_root = Path(pairs_file), Path(images_root)
    n_folds, per_fold, lines = pairs_header(pairs_file)
    body = [(i + 2, ln.strip()) for i, ln in enumerate(lines[1:]) if ln.strip()]
    if len(body) != 2 * n_folds * per_fold:
        raise ZooError(f"{pairs_file}: the header '{lines[0].strip()}' announces {n_folds} folds x {per_fold} same + "
                       f"{per_fold} different pairs = {2 * n_folds * per_fold} lines, but the file has {len(body)}.")
    pairs = []
    for k, (line_no, text) in enumerate(body):
        fold, same = k // (2 * per_fold), (k % (2 * per_fold)) < per_fold
        parts = text.split()
        try:
            if same and len(parts) == 3:
                a, b = lfw_image(images_root, parts[0], int(parts[1])), lfw_image(images_root, parts[0], int(parts[2]))
            elif not same and len(parts) == 4:
                a, b = lfw_image(images_root, parts[0], int(parts[1])), lfw_image(images_root, parts[2], int(parts[3]))
            else:
                raise ValueError
        except ValueError:
            kind = "'name i j' (same person)" if same else "'name1 i name2 j' (different people)"
            raise ZooError(f"{pairs_file} line {line_no} '{text}': expected {kind} at this position (fold {fold + 1}, "
                           f"the first {per_fold} lines of each fold are same-person pairs).") from None
        pairs.append(Pair(a, b, same, fold, line_no, text))
    return pairs


@dataclass
class PairSet:
    """The pairs of a protocol whose images are all present: `pairs` (scored folds, then calibration-only pairs),
    and what was left out, for the report."""

    file: Path
    pairs: list[Pair]
    total: int  # pairs in the file
    skipped: list[Pair] = field(default_factory=list)  # scored-file pairs with a missing or unreadable image
    calibration_file: Path | None = None

    @property
    def scored(self) -> list[Pair]:
        return [p for p in self.pairs if p.fold != CALIBRATION_FOLD]

    @property
    def images(self) -> list[Path]:
        return sorted({q for p in self.pairs for q in (p.a, p.b)})

    @property
    def note(self) -> str:
        """'pairs.txt: 1,234 of 6,000 pairs scored (4,766 name images that are not here), 10 folds'."""
        folds = len({p.fold for p in self.scored})
        text = f"{self.file.name}: {len(self.scored)} of {self.total} pairs scored"
        if self.skipped:
            first = self.skipped[0]
            text += f" ({len(self.skipped)} skipped: an image is missing or unreadable, e.g. line {first.line_no} '{' '.join(first.text.split())}')"
        if folds > 1:
            return text + f", {folds} folds, thresholds from the other folds"
        if self.calibration_file is not None:
            n = len(self.pairs) - len(self.scored)
            return text + f", one fold, threshold from {self.calibration_file.name} ({n} pairs)"
        return text + ", one fold, threshold by cross-validation inside the file"


def load_pairs(pairs_file: str | Path, images_root: str | Path, exclude: set[Path] | frozenset = frozenset()) -> PairSet:
    """The pairs of `pairs_file` whose two images exist (and are not in `exclude`, e.g. unreadable files).

    A one-fold file gets, as calibration pairs, those of `pairsDevTrain.txt` beside it (unless it is that file).
    A file none of whose pairs can be scored is a ZooError naming the first missing image.
    """
    pairs_file, images_root = Path(pairs_file), Path(images_root)
    if not pairs_file.is_file():
        raise ZooError(f"pairs file {pairs_file} not found. Give the path of LFW's pairs.txt, or --set "
                       f"pairs_file=none to train without the verification protocol.")

    def usable(p: Pair) -> bool:
        return all(q.is_file() and q not in exclude for q in (p.a, p.b))

    every = read_pairs(pairs_file, images_root)
    kept = [p for p in every if usable(p)]
    skipped = [p for p in every if not usable(p)]
    if not kept:
        first = skipped[0]
        missing = next(q for q in (first.a, first.b) if not q.is_file() or q in exclude)
        raise ZooError(f"{pairs_file}: none of its {len(every)} pairs can be scored under {images_root}; e.g. line "
                       f"{first.line_no} '{first.text}': image {missing} not found or unreadable. pairs.txt must sit "
                       f"with the LFW images it names (<root>/<name>/<name>_0001.jpg); check --data-dir, or --set "
                       f"pairs_file=none.")
    calibration_file = None
    if len({p.fold for p in every}) == 1:
        dev_train = pairs_file.parent / DEV_TRAIN
        if dev_train.is_file() and dev_train.resolve() != pairs_file.resolve():
            calib = [Pair(p.a, p.b, p.same, CALIBRATION_FOLD, p.line_no, p.text)
                     for p in read_pairs(dev_train, images_root) if usable(p)]
            if any(p.same for p in calib) and not all(p.same for p in calib):
                kept += calib
                calibration_file = dev_train
    return PairSet(pairs_file, kept, len(every), skipped, calibration_file)
